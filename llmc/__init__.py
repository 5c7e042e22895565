"""llmc: a compiler-style optimization toolchain for large language models.

The public API (imported on first use, so ``import llmc`` stays light)::

    from llmc import SamplingParams, load

    with load("SmolLM2-135M-Instruct.Q4_1.gguf") as engine:   # an artifact, a GGUF file or an HF folder
        out = engine.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0]
        print(out.text)

- :func:`load`: an :class:`Engine` for a model; a GGUF file or Hugging Face folder is compiled
  once into the artifact cache (:mod:`llmc.artifact_cache`) and reused.
- :func:`compile_model` with :class:`CompileOptions`: compile into an artifact folder of your own.
- :class:`Engine` (continuous batching: ``generate``, ``stream``, ``submit``, ``cancel``,
  ``stats``, ``close``), :class:`SamplingParams`, :class:`RequestOutput`, :class:`StreamChunk`.
- :class:`ChatSession` (a conversation in the model's chat template) and :func:`stream_chunks`
  (streaming without an event loop).
- :class:`LlmcError`: the base of every error a user can cause.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import __version__

if TYPE_CHECKING:
    from llmc.api import load
    from llmc.chat import ChatSession, stream_chunks
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.engine import Engine, EngineConfig
    from llmc.runtime.outputs import RequestOutput, StreamChunk
    from llmc.runtime.sampling import SamplingParams

_LAZY = {
    "load": "llmc.api",
    "compile_model": "llmc.driver",
    "CompileOptions": "llmc.driver",
    "Engine": "llmc.runtime.engine",
    "EngineConfig": "llmc.runtime.engine",
    "SamplingParams": "llmc.runtime.sampling",
    "RequestOutput": "llmc.runtime.outputs",
    "StreamChunk": "llmc.runtime.outputs",
    "ChatSession": "llmc.chat",
    "stream_chunks": "llmc.chat",
}

__all__ = [
    "ChatSession", "CompileOptions", "Engine", "EngineConfig", "LlmcError", "RequestOutput", "SamplingParams",
    "StreamChunk", "__version__", "compile_model", "load", "stream_chunks",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
