"""``llmc inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from llmc.cli.common import emit_json


@click.command(name="inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ir/--no-ir", "show_ir", default=False, help="Print the full IR text.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(artifact: Path, show_ir: bool, as_json: bool) -> None:
    """Summarize an ARTIFACT: manifest, op counts, params (and the IR with --ir)."""
    from llmc.runtime.inspect import summarize

    summary, ir_text = summarize(artifact)
    if as_json:
        emit_json(summary)
    else:
        click.echo(summary["text"])
    if show_ir:
        click.echo(ir_text)

