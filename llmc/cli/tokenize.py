"""``llmc tokenize``."""

from __future__ import annotations

from pathlib import Path

import click

from llmc.cli.common import emit_json
from llmc.compiler.errors import LlmcError


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--text", required=True, help="The text to tokenize.")
@click.option("--no-special", is_flag=True, help="Do not add BOS/special tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the ids and their tokens as JSON.")
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
        emit_json({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]})
    else:
        click.echo(" ".join(map(str, ids)))

