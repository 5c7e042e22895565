"""Every command and option says what it is for; every install hint names llmc's distribution."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from llmc.cli import main
from llmc.compiler.version import DISTRIBUTION, install_hint

ROOT = Path(__file__).resolve().parents[2]


def _commands(group: click.Group, path: str = "llmc") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name, command in group.commands.items():
        found.append((f"{path} {name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{path} {name}")
    return found


@pytest.mark.parametrize(("path", "command"), _commands(main), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_and_option_has_help(path: str, command: click.Command) -> None:
    assert command.help, f"{path} has no help"
    bare = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help]
    assert not bare, f"{path}: options without help: {bare}"


def test_install_hints_name_the_distribution() -> None:
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"] == DISTRIBUTION
    assert install_hint("serve") == f"pip install '{DISTRIBUTION}[serve]'"
    wrong = []
    for folder in ("llmc", "compiler", "passes", "runtime", "targets", "tests", "examples", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh") and re.search(r"pip install ['\"]?llmc\[", path.read_text()):
                wrong.append(str(path.relative_to(ROOT)))
    assert not re.search(r"pip install ['\"]?llmc\[", (ROOT / "README.md").read_text())
    assert not wrong, f"install hints naming the wrong distribution ('llmc' on PyPI is another project): {wrong}"
