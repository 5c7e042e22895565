"""Error types raised by llmc.

Every error a user can cause (bad file, bad option, bad request) is an :class:`LlmcError`
subclass whose message names the offending file, tensor, node or option. The CLI prints
the message on one line and exits with status 2; tracebacks are for llmc's own bugs.
"""

from __future__ import annotations


class LlmcError(Exception):
    """Base class of every error llmc raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message} (hint: {hint})")


class InputError(LlmcError):
    """A model file or folder is missing, truncated or malformed."""


class UnsupportedError(LlmcError):
    """The input is well formed but uses something llmc does not support."""


class IRError(LlmcError):
    """The IR is malformed (raised by the verifier and the parser)."""


class PassError(LlmcError):
    """A pass failed or left the IR malformed."""


class ArtifactError(LlmcError):
    """An artifact is missing files, corrupt, or of an incompatible schema."""


class TargetUnavailableError(LlmcError):
    """A target backend (onnxruntime, tvm, tensorrt, a GPU) is not usable here."""


class RequestError(LlmcError):
    """A generation request is invalid (prompt over the context, bad sampling values)."""


class QualityGateError(LlmcError):
    """A quantized build failed its accuracy budget."""
