"""``llmc run``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from llmc.cli.common import emit_json
from llmc.compiler.errors import LlmcError


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise LlmcError(f"--prompt-ids must be integers separated by spaces: {text!r}") from exc


def _read_prompts_file(path: Path) -> list[str | list[int]]:
    """One prompt per line, or JSONL objects with "prompt" (text or a list of token ids)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise LlmcError(f"{path}: {exc}") from exc
    prompts: list[str | list[int]] = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LlmcError(f"{path}:{number}: expected a JSON object with a \"prompt\" key") from exc
            is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
            if not isinstance(prompt, str) and not is_ids:
                raise LlmcError(f"{path}:{number}: \"prompt\" must be a string or a list of token ids")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise LlmcError(f"{path} has no prompts")
    return prompts


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", default=None, help='Prompt token ids, e.g. "1 2 3".')
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None,
              help="Many prompts, run concurrently: one per line, or JSONL with \"prompt\".")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--top-p", default=1.0, type=float)
@click.option("--seed", default=None, type=click.IntRange(0, 2**64 - 1), help="Sampling seed (>= 0).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after EOS.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads for the executor.")
@click.option("--max-running", default=32, show_default=True, type=click.IntRange(1),
              help="Sequences decoded together.")
@click.option("--deterministic", is_flag=True, help="Batch-invariant kernels: results independent of batching.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (one line per prompt with --prompts-file).")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, prompts_file: Path | None, max_tokens: int,
        temperature: float, top_k: int, top_p: float, seed: int | None, stop: tuple[str, ...], ignore_eos: bool,
        device: str | None, threads: int | None, max_running: int, deterministic: bool, as_json: bool) -> None:
    """Generate text from a compiled ARTIFACT."""
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    if sum(x is not None for x in (prompt, prompt_ids, prompts_file)) != 1:
        raise LlmcError("give exactly one of --prompt, --prompt-ids or --prompts-file")
    prompts: list[str | list[int]]
    if prompts_file is not None:
        prompts = _read_prompts_file(prompts_file)
    elif prompt is not None:
        prompts = [prompt]
    else:
        prompts = [_parse_ids(prompt_ids or "")]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=list(stop), ignore_eos=ignore_eos)
    with Engine.load(str(artifact), device=device, threads=threads, max_running=max_running,
                     max_num_tokens=max(512, max_running), deterministic=deterministic) as engine:
        if engine.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise LlmcError(f"{artifact} has no tokenizer; use --prompt-ids (or token id lists in --prompts-file)")
        outputs = engine.generate(prompts, params)
    for out in outputs:
        record = {"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
                  "finish_reason": out.finish_reason, "timings": out.timings}
        if as_json and prompts_file is not None:
            click.echo(json.dumps(record))
        elif as_json:
            emit_json(record)
        else:
            click.echo(out.text if out.text is not None else " ".join(map(str, out.token_ids)))

