"""``llmc passes``."""

from __future__ import annotations

import click

from llmc.cli.common import emit_json


@click.command(name="passes")
@click.option("--target", default=None, help="Also show what each level runs for this target.")
@click.option("--json", "as_json", is_flag=True, help="Print the passes and pipelines as JSON.")
def passes_cmd(target: str | None, as_json: bool) -> None:
    """List every pass (name, doc) and every pipeline with its passes."""
    from llmc.passes.listing import describe_passes, format_passes
    from llmc.runtime.registry import get_target

    if target is None:
        data = describe_passes()
    else:
        chosen = get_target(target)
        data = describe_passes(chosen.name, chosen.capabilities().fused_ops, chosen.preferred_passes,
                               chosen.rewrites)
    if as_json:
        emit_json(data)
    else:
        click.echo(format_passes(data))
