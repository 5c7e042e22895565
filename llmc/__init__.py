"""llmc: a compiler-style optimization toolchain for large language models."""

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import __version__

__all__ = ["LlmcError", "__version__"]
