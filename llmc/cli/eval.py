"""``llmc eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmc.cli.common import MODEL_HELP, compile_on_first_use, emit_json, resolve_model
from llmc.compiler.errors import LlmcError

_FORMATS = {"mean_nll": "{:.4f}", "perplexity": "{:.4f}", "kl_mean": "{:.4g}", "top1_agreement": "{:.2%}"}


def format_result(result: dict[str, Any]) -> str:
    """Aligned ``key: value`` lines, numbers rounded for reading (``--json`` keeps full precision)."""
    lines = []
    for key, value in result.items():
        if value is not None:
            shown = _FORMATS.get(key, "{}").format(value)
            lines.append(f"{key:>16}: {shown}")
    return "\n".join(lines)


def _read_eval_ids(model: Any, text_file: Path | None, ids_file: Path | None) -> list[int]:
    from llmc.compiler.token_ids import read_token_ids

    if (text_file is None) == (ids_file is None):
        raise LlmcError("give exactly one of --text-file or --ids-file")
    if ids_file is not None:
        return read_token_ids(ids_file, "--ids-file")
    assert text_file is not None
    if model.tokenizer is None:
        raise LlmcError("this artifact has no tokenizer; use --ids-file")
    try:
        text = text_file.read_text()
    except OSError as exc:
        raise LlmcError(f"{text_file}: {exc}") from exc
    return list(model.tokenizer.encode(text))


@click.command(name="eval")
@click.argument("artifact", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None, help="Text to score (tokenized by MODEL).")
@click.option("--ids-file", type=click.Path(path_type=Path), default=None,
              help="Token ids to score (a JSON list of integers).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference model (artifact, GGUF or folder; the last two compiled unquantized): adds KL "
                   "divergence and top-1 agreement.")
@click.option("--window", type=click.IntRange(2), default=None, help="Scoring window (default: the model context).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (full precision).")
@compile_on_first_use
def eval_cmd(artifact: Path, text_file: Path | None, ids_file: Path | None, reference: Path | None,
             window: int | None, as_json: bool, compile_target: str, quant: str | None) -> None:
    """Perplexity of MODEL on a text (and divergence from a reference model). MODEL_HELP"""
    from llmc.runtime.evaluate import evaluate
    from llmc.runtime.loader import load_model

    model = load_model(str(resolve_model(artifact, compile_target, quant)))
    ids = _read_eval_ids(model, text_file, ids_file)
    ref = None
    if reference is not None:
        ref = load_model(str(resolve_model(reference, compile_target, "none"))).executor
    result = evaluate(model.executor, ids, reference=ref, window=window).to_dict()
    if as_json:
        emit_json(result)
    else:
        click.echo(format_result(result))


eval_cmd.help = (eval_cmd.help or "").replace("MODEL_HELP", MODEL_HELP)
