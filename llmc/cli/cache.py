"""``llmc cache``: the builds of GGUF files and Hugging Face folders compiled on first use."""

from __future__ import annotations

import click

from llmc.cli.common import emit_json


@click.group(name="cache")
def cache_cmd() -> None:
    """The artifact cache: models that `llmc run/chat/serve/eval/bench` compiled on first use."""


@cache_cmd.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per build.")
def cache_ls(as_json: bool) -> None:
    """List the cached builds: name, size, target, quantization and source."""
    from llmc.artifact_cache import artifacts_dir, cached_artifacts

    entries = cached_artifacts()
    if as_json:
        emit_json([e.to_dict() for e in entries])
        return
    click.echo(f"{artifacts_dir()}: {len(entries)} build{'s' if len(entries) != 1 else ''}, "
               f"{sum(e.bytes for e in entries) / 1e6:.1f} MB")
    for e in entries:
        click.echo(f"  {e.name}  {e.bytes / 1e6:.1f} MB  {e.target} --quant {e.quant}  from {e.source}  "
                   f"({e.created})")


@cache_cmd.command(name="rm")
@click.argument("names", nargs=-1)
@click.option("--all", "remove_all", is_flag=True, help="Remove every build (and unfinished ones).")
def cache_rm(names: tuple[str, ...], remove_all: bool) -> None:
    """Remove cached builds by NAME (as `llmc cache ls` prints them), or all of them with --all."""
    from llmc.artifact_cache import remove_cached
    from llmc.compiler.errors import LlmcError

    if bool(names) == remove_all:
        raise LlmcError("give the NAMEs of builds to remove (see `llmc cache ls`) or --all")
    gone = remove_cached(None if remove_all else list(names))
    click.echo(f"removed {len(gone)} entr{'ies' if len(gone) != 1 else 'y'}")
