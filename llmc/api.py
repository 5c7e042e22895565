""":func:`load`: an engine for any model llmc reads, compiled on first use (``from llmc import load``)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from llmc.artifact_cache import default_options, resolve_model
from llmc.compiler.progress import reporting
from llmc.console import ConsoleReporter
from llmc.runtime.engine import Engine


def load(model: str | Path, *, target: str = "torch", quant: str | None = None, progress: bool | None = None,
         **engine_options: Any) -> Engine:
    """An :class:`~llmc.runtime.engine.Engine` for ``model``: an artifact folder, or a GGUF file or a
    Hugging Face folder, compiled once (for ``target``, with ``quant``: by default a GGUF's own
    quantized blocks) into the artifact cache and reused afterwards.

    ``progress`` shows the compile's steps on stderr (default: when stderr is a terminal);
    ``engine_options`` are :class:`~llmc.runtime.engine.EngineConfig` fields (``max_running``,
    ``device``, ``threads``, ``deterministic``, ...).
    """
    show = sys.stderr.isatty() if progress is None else progress
    with reporting(ConsoleReporter()) if show else contextlib.nullcontext():
        options = default_options(model, target, quant, engine_options.get("device"))
        path = resolve_model(model, options)
    return Engine.load(str(path), **engine_options)
