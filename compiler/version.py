"""llmc's version: recorded in every artifact and bench report (pyproject.toml reads it from here)."""

__version__ = "0.1.0"

DISTRIBUTION = "llmc-toolchain"
"""The name llmc is installed under (``pip install llmc-toolchain``): ``llmc`` on PyPI is another
project. The import name and the command stay ``llmc``."""


def install_hint(extra: str) -> str:
    """The command that installs one of llmc's extras, e.g. ``pip install 'llmc-toolchain[serve]'``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
