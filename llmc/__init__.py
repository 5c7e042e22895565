"""llmc: a compiler-style optimization toolchain for large language models."""

from llmc.errors import LlmcError

__version__ = "0.1.0"

__all__ = ["LlmcError", "__version__"]
