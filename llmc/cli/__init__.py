"""The ``llmc`` command line: one module per command. Parsing and printing only: work happens
in the packages (the compile driver, the runtime)."""

from __future__ import annotations

from typing import Any

import click

from llmc.cli.bench import bench
from llmc.cli.cache import cache_cmd
from llmc.cli.chat import chat
from llmc.cli.compile import compile_cmd
from llmc.cli.eval import eval_cmd
from llmc.cli.inspect import inspect_cmd
from llmc.cli.passes import passes_cmd
from llmc.cli.run import run
from llmc.cli.serve import serve
from llmc.cli.synth import synth
from llmc.cli.targets import targets_cmd
from llmc.cli.tokenize import tokenize
from llmc.compiler.errors import LlmcError
from llmc.compiler.progress import reporting
from llmc.compiler.version import __version__
from llmc.console import ConsoleReporter


class LlmcGroup(click.Group):
    """Turns :class:`LlmcError` into one line on stderr and exit status 2, and shows the progress of
    long steps (compiling, downloading) on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with reporting(ConsoleReporter()):
                return super().invoke(ctx)
        except LlmcError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LlmcGroup)
@click.version_option(__version__, prog_name="llmc")
def main() -> None:
    """llmc: compile LLMs into optimized artifacts and serve them."""


for _command in (compile_cmd, run, chat, eval_cmd, tokenize, inspect_cmd, passes_cmd, targets_cmd, serve, synth,
                 bench, cache_cmd):
    main.add_command(_command)

__all__ = ["main"]

