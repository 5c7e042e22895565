"""The ``llmc`` command line. Parsing and printing only: work happens in the packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llmc import __version__
from llmc.errors import LlmcError


class LlmcGroup(click.Group):
    """Turns :class:`LlmcError` into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlmcError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LlmcGroup)
@click.version_option(__version__, prog_name="llmc")
def main() -> None:
    """llmc: compile LLMs into optimized artifacts and serve them."""


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=1))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--target", default="torch", show_default=True, help="Code generator (see `llmc targets`).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Weight dtype (default: as stored).")
@click.option("--device", default="cpu", show_default=True, help="Device the artifact is built for.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True, help="Pipeline O0..O3.")
@click.option("--passes", default=None, help='Custom pipeline, e.g. "dce,fuse-qkv,fuse-gate-up".')
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="Write the IR after every pass here.")
def compile(source: Path, out: Path, target: str, dtype: str | None, device: str, opt_level: int,
            passes: str | None, dump_ir: Path | None) -> None:
    """Compile SOURCE (a Hugging Face folder or a .gguf file) into an artifact."""
    from llmc.compiler.driver import CompileOptions, compile_model

    options = CompileOptions(target=target, dtype=dtype, opt_level=opt_level, passes=passes,
                             dump_ir=dump_ir, device=device)
    path = compile_model(source, out, options)
    click.echo(f"wrote {path}")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise LlmcError(f"--prompt-ids must be integers separated by spaces: {text!r}") from exc


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", default=None, help='Prompt token ids, e.g. "1 2 3".')
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--top-p", default=1.0, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, max_tokens: int, temperature: float,
        top_k: int, top_p: float, seed: int | None, device: str | None, as_json: bool) -> None:
    """Generate text from a compiled ARTIFACT."""
    from llmc.runtime.generate import generate_ids, load_model
    from llmc.runtime.sampling import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise LlmcError("give exactly one of --prompt or --prompt-ids")
    model = load_model(str(artifact), device=device)
    if prompt is not None:
        if model.tokenizer is None:
            raise LlmcError(f"{artifact} has no tokenizer; use --prompt-ids")
        ids = model.tokenizer.encode(prompt)
    else:
        ids = _parse_ids(prompt_ids or "")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    result = generate_ids(model, ids, params)
    text = model.tokenizer.decode(result.token_ids) if model.tokenizer is not None else None
    if as_json:
        _emit_json({
            "text": text,
            "token_ids": result.token_ids,
            "prompt_token_ids": result.prompt_token_ids,
            "finish_reason": result.finish_reason,
            "timings": result.timings,
        })
    else:
        click.echo(text if text is not None else " ".join(map(str, result.token_ids)))


def _read_eval_ids(model: Any, text_file: Path | None, ids_file: Path | None) -> list[int]:
    if (text_file is None) == (ids_file is None):
        raise LlmcError("give exactly one of --text-file or --ids-file")
    if ids_file is not None:
        try:
            ids = json.loads(ids_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LlmcError(f"{ids_file}: cannot read a JSON list of ids: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise LlmcError(f"{ids_file}: expected a JSON list of integers")
        return ids
    assert text_file is not None
    if model.tokenizer is None:
        raise LlmcError("this artifact has no tokenizer; use --ids-file")
    try:
        text = text_file.read_text()
    except OSError as exc:
        raise LlmcError(f"{text_file}: {exc}") from exc
    return list(model.tokenizer.encode(text))


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None)
@click.option("--ids-file", type=click.Path(path_type=Path), default=None)
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference artifact: adds KL divergence and top-1 agreement.")
@click.option("--window", type=int, default=None, help="Scoring window (default: the model context).")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(artifact: Path, text_file: Path | None, ids_file: Path | None, reference: Path | None,
             window: int | None, as_json: bool) -> None:
    """Perplexity of ARTIFACT on a text (and divergence from a reference artifact)."""
    from llmc.runtime.evaluate import evaluate
    from llmc.runtime.generate import load_model

    model = load_model(str(artifact))
    ids = _read_eval_ids(model, text_file, ids_file)
    ref = load_model(str(reference)).executor if reference is not None else None
    result = evaluate(model.executor, ids, reference=ref, window=window).to_dict()
    if as_json:
        _emit_json(result)
    else:
        for key, value in result.items():
            if value is not None:
                click.echo(f"{key:>16}: {value}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--text", required=True)
@click.option("--no-special", is_flag=True, help="Do not add BOS/special tokens.")
@click.option("--json", "as_json", is_flag=True)
def tokenize(source: Path, text: str, no_special: bool, as_json: bool) -> None:
    """Tokenize TEXT with the tokenizer of SOURCE (a model file/folder or an artifact)."""
    from llmc.runtime.artifact import MANIFEST, Artifact

    if (source / MANIFEST).exists():
        tokenizer = Artifact.load(source, verify=False).tokenizer()
    else:
        from llmc.compiler.frontends.source import load_source

        tokenizer = load_source(source).tokenizer
    if tokenizer is None:
        raise LlmcError(f"{source} has no tokenizer")
    ids = tokenizer.encode(text, add_special_tokens=not no_special)
    if as_json:
        _emit_json({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]})
    else:
        click.echo(" ".join(map(str, ids)))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ir/--no-ir", "show_ir", default=False, help="Print the full IR text.")
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, show_ir: bool, as_json: bool) -> None:
    """Summarize an ARTIFACT: manifest, op counts, params (and the IR with --ir)."""
    from llmc.runtime.inspect import summarize

    summary, ir_text = summarize(artifact)
    if as_json:
        _emit_json(summary)
    else:
        click.echo(summary["text"])
    if show_ir:
        click.echo(ir_text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
