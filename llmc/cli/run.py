"""``llmc run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llmc.cli.common import MODEL_HELP, compile_on_first_use, emit_json, resolve_model
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
@click.argument("artifact", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text; - reads it from stdin.")
@click.option("--prompt-ids", default=None, help='Prompt token ids, e.g. "1 2 3".')
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None,
              help="Many prompts, run concurrently: one per line, or JSONL with \"prompt\".")
@click.option("--chat", "use_chat", is_flag=True,
              help="Apply the model's chat template to each text prompt (a user message); for instruct models.")
@click.option("--system", default=None, help="System prompt placed before the user message (with --chat).")
@click.option("--max-tokens", default=64, show_default=True, type=int, help="Most tokens to generate per prompt.")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Sampling temperature; 0 picks the most likely token (greedy).")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=float,
              help="Sample among the most likely tokens whose probabilities add up to p (nucleus sampling).")
@click.option("--seed", default=None, type=click.IntRange(0, 2**64 - 1),
              help="Random seed of the sampler, >= 0 (default: a fresh one each run).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after EOS.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads for the executor.")
@click.option("--max-running", default=32, show_default=True, type=click.IntRange(1),
              help="Sequences decoded together.")
@click.option("--deterministic", is_flag=True, help="Batch-invariant kernels: results independent of batching.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (one line per prompt with --prompts-file).")
@compile_on_first_use
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, prompts_file: Path | None, use_chat: bool,
        system: str | None, max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
        stop: tuple[str, ...], ignore_eos: bool, device: str | None, threads: int | None, max_running: int,
        deterministic: bool, as_json: bool, compile_target: str, quant: str | None) -> None:
    """Generate text from MODEL: a completion of each prompt (with --chat: the answer to it).

    A single prompt streams to a terminal as it is generated. MODEL_HELP
    """
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    if sum(x is not None for x in (prompt, prompt_ids, prompts_file)) != 1:
        raise LlmcError("give exactly one of --prompt, --prompt-ids or --prompts-file")
    if system is not None and not use_chat:
        raise LlmcError("--system needs --chat (it is part of the chat template)")
    prompts: list[str | list[int]]
    if prompts_file is not None:
        prompts = _read_prompts_file(prompts_file)
    elif prompt is not None:
        prompts = [_read_stdin_prompt() if prompt == "-" else prompt]
    else:
        prompts = [_parse_ids(prompt_ids or "")]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=list(stop), ignore_eos=ignore_eos)
    path = resolve_model(artifact, compile_target, quant, device)
    with Engine.load(str(path), device=device, threads=threads, max_running=max_running,
                     max_num_tokens=max(512, max_running), deterministic=deterministic) as engine:
        if engine.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise LlmcError(f"{artifact} has no tokenizer; use --prompt-ids (or token id lists in --prompts-file)")
        inputs = _apply_chat_template(engine, prompts, system) if use_chat else prompts
        if len(inputs) == 1 and not as_json and engine.tokenizer is not None and sys.stdout.isatty():
            outputs = [_stream_to_stdout(engine, inputs[0], params)]
        else:
            outputs = engine.generate(inputs, params)
            _print_outputs(prompts, outputs, as_json, prompts_file is not None)
        if not use_chat and engine.tokenizer is not None and engine.tokenizer.has_chat_template \
                and any(out.text is not None and not out.text.strip() for out in outputs):
            click.echo(f"hint: the answer is empty; {artifact.name} has a chat template, so it is probably an "
                       f"instruct model that expects one: try --chat, or `llmc chat {artifact}`", err=True)


run.help = (run.help or "").replace("MODEL_HELP", MODEL_HELP)


def _read_stdin_prompt() -> str:
    text = sys.stdin.read()
    if not text.strip():
        raise LlmcError("--prompt - read an empty prompt from stdin")
    return text.rstrip("\n")


def _apply_chat_template(engine: Any, prompts: list[str | list[int]], system: str | None) -> list[str | list[int]]:
    """Each text prompt as a user message (after ``system``) in the model's chat template, as token ids."""
    tokenizer = engine.tokenizer
    if not tokenizer.has_chat_template:
        raise LlmcError("--chat: this model has no chat template; give the prompt without --chat")
    if any(not isinstance(p, str) for p in prompts):
        raise LlmcError("--chat applies to text prompts, not token ids")
    head = [{"role": "system", "content": system}] if system is not None else []
    return [tokenizer.encode_chat([*head, {"role": "user", "content": p}]) for p in prompts]


def _stream_to_stdout(engine: Any, prompt: str | list[int], params: Any) -> Any:
    """Print the text as it is generated; Ctrl-C stops (the output so far stays)."""
    from llmc.chat import stream_chunks

    output = None
    stream = stream_chunks(engine, prompt, params)
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            output = chunk.output or output
    except KeyboardInterrupt:
        stream.close()
        click.echo()
        raise click.Abort() from None
    click.echo()
    return output


def _describe_prompt(prompt: str | list[int], width: int = 72) -> str:
    text = " ".join(prompt.split()) if isinstance(prompt, str) else "ids " + " ".join(map(str, prompt))
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_outputs(prompts: list[str | list[int]], outputs: list[Any], as_json: bool, many: bool) -> None:
    for number, (prompt, out) in enumerate(zip(prompts, outputs, strict=True), 1):
        record = {"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
                  "finish_reason": out.finish_reason, "timings": out.timings}
        text = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        if as_json and many:
            click.echo(json.dumps(record))
        elif as_json:
            emit_json(record)
        elif many:  # a header per prompt, a blank line between answers
            if number > 1:
                click.echo()
            click.echo(click.style(f"[{number}/{len(prompts)}] {_describe_prompt(prompt)}", bold=True))
            click.echo(text.strip("\n"))
        else:
            click.echo(text)

