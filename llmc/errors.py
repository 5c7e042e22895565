"""The public home of llmc's error types (they are defined in :mod:`llmc.compiler.errors`,
the bottom layer, so that every package can raise them without importing the top)."""

from llmc.compiler.errors import (
    ArtifactError,
    InputError,
    IRError,
    LlmcError,
    PassError,
    QualityGateError,
    RequestError,
    TargetUnavailableError,
    UnsupportedError,
)

__all__ = [
    "ArtifactError",
    "IRError",
    "InputError",
    "LlmcError",
    "PassError",
    "QualityGateError",
    "RequestError",
    "TargetUnavailableError",
    "UnsupportedError",
]
