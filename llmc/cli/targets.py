"""``llmc targets``: every registered target, whether it runs here, and what it supports."""

from __future__ import annotations

from typing import Any

import click

from llmc.cli.common import emit_json


def describe_targets() -> list[dict[str, Any]]:
    """One record per registered target: name, doc, availability here (and why not), capabilities."""
    from llmc.compiler.errors import LlmcError
    from llmc.runtime.registry import get_target, target_names

    records: list[dict[str, Any]] = []
    for name in target_names():
        try:
            target = get_target(name)
        except LlmcError as exc:
            records.append({"name": name, "doc": "", "available": False, "reason": str(exc)})
            continue
        reason = target.availability()
        records.append({"name": name, "doc": target.doc, "available": reason is None, "reason": reason,
                        **target.capabilities().to_dict()})
    return records


@click.command(name="targets")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per target.")
def targets_cmd(as_json: bool) -> None:
    """List the targets: whether each can run here (and why not), its devices and quant modes."""
    records = describe_targets()
    if as_json:
        emit_json(records)
        return
    for r in records:
        state = "available" if r["available"] else f"unavailable: {r['reason']}"
        click.echo(f"{r['name']:<9} {state}")
        if "devices" in r:
            click.echo(f"          devices {', '.join(r['devices'])}; quant {', '.join(r['quant_modes'])}; "
                       f"kv {r['kv_layout']}" + ("; deterministic mode" if r["deterministic"] else ""))
        if r["doc"]:
            click.echo(f"          {r['doc']}")
