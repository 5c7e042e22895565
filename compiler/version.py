"""llmc's version: recorded in every artifact and bench report (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
