"""The public home of llmc's error types (they are defined in :mod:`llmc.compiler.errors`,
the bottom layer, so that every package can raise them without importing the top; the engine's
typed refusals in :mod:`llmc.runtime.errors`)."""

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
from llmc.runtime.errors import (
    ContextLengthError,
    EmptyPromptError,
    EngineClosedError,
    KVCacheTooSmallError,
    QueueFullError,
    TokenIdError,
)

__all__ = [
    "ArtifactError",
    "ContextLengthError",
    "EmptyPromptError",
    "EngineClosedError",
    "IRError",
    "InputError",
    "KVCacheTooSmallError",
    "LlmcError",
    "PassError",
    "QualityGateError",
    "QueueFullError",
    "RequestError",
    "TargetUnavailableError",
    "TokenIdError",
    "UnsupportedError",
]
