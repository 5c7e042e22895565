"""``llmc eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmc.cli.common import emit_json
from llmc.compiler.errors import LlmcError


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
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None)
@click.option("--ids-file", type=click.Path(path_type=Path), default=None)
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference artifact: adds KL divergence and top-1 agreement.")
@click.option("--window", type=click.IntRange(2), default=None, help="Scoring window (default: the model context).")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(artifact: Path, text_file: Path | None, ids_file: Path | None, reference: Path | None,
             window: int | None, as_json: bool) -> None:
    """Perplexity of ARTIFACT on a text (and divergence from a reference artifact)."""
    from llmc.runtime.evaluate import evaluate
    from llmc.runtime.loader import load_model

    model = load_model(str(artifact))
    ids = _read_eval_ids(model, text_file, ids_file)
    ref = load_model(str(reference)).executor if reference is not None else None
    result = evaluate(model.executor, ids, reference=ref, window=window).to_dict()
    if as_json:
        emit_json(result)
    else:
        for key, value in result.items():
            if value is not None:
                click.echo(f"{key:>16}: {value}")
