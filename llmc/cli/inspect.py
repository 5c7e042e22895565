"""``llmc inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from llmc.cli.common import emit_json


@click.command(name="inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ir/--no-ir", "show_ir", default=False, help="Print the full IR text.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--memory", default="8GiB", show_default=True,
              help="Device memory of the capacity report (weights + activations + KV cache), e.g. 80GiB.")
@click.option("--seq-lens", default=None,
              help="Sequence lengths (prompt + output) of the capacity report, e.g. 2048,8192 "
                   "(default: 512, 2048, 8192 and the model's context).")
def inspect_cmd(artifact: Path, show_ir: bool, as_json: bool, memory: str, seq_lens: str | None) -> None:
    """Summarize an ARTIFACT: manifest, op counts, params, how many sequences fit in --memory (and the IR
    with --ir)."""
    from llmc.compiler.errors import InputError
    from llmc.compiler.options import parse_bytes
    from llmc.runtime.inspect import summarize

    lengths = None
    if seq_lens:
        try:
            lengths = [int(t) for t in seq_lens.replace(" ", "").split(",") if t]
        except ValueError:
            lengths = []
        if not lengths or min(lengths) < 1:
            raise InputError(f"--seq-lens must be comma-separated positive integers, got {seq_lens!r}")
    summary, ir_text = summarize(artifact, parse_bytes(memory, "--memory"), lengths)
    if as_json:
        emit_json(summary)
    else:
        click.echo(summary["text"])
    if show_ir:
        click.echo(ir_text)

