"""The peers ``benchmarks/peers.py`` runs beside llmc, one module each, all behind the
:class:`llmc.runtime.bench.Backend` interface: :mod:`.llama_cpp` (``llama.cpp``), :mod:`.hf`
(``hf-eager``, ``hf-compile``) and :mod:`.ort_genai` (``ort-genai``); :func:`make_backend` builds
the one a worker process runs (:mod:`.worker`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.errors import LlmcError
from llmc.runtime.bench import Backend, LlmcBackend

from .hf import HFBackend
from .llama_cpp import LlamaCppBackend
from .ort_genai import OrtGenaiBackend, build_ort_genai

__all__ = ["PEER_ENGINES", "HFBackend", "LlamaCppBackend", "OrtGenaiBackend", "build_ort_genai", "make_backend"]

PEER_ENGINES = ("llama.cpp", "hf-eager", "hf-compile", "ort-genai")


def make_backend(spec: dict[str, Any]) -> Backend:
    """The backend of one engine (``llmc:PATH`` or a name in :data:`PEER_ENGINES`) for a worker's ``spec``."""
    engine, s = spec["engine"], spec["settings"]
    threads = int(s["threads"])
    if engine.startswith("llmc:"):
        return LlmcBackend(engine.split(":", 1)[1], threads=threads, device=spec.get("device"))
    if engine == "llama.cpp":
        sizes = [2]  # the greedy probe runs two sequences
        if "batch" in s["scenarios"]:
            sizes += s["batch_sizes"]
        if "concurrency" in s["scenarios"]:
            sizes += s["concurrency"]
        return LlamaCppBackend(spec["gguf"], threads, max(sizes), s["prompt_len"] + s["gen_len"])
    if engine in ("hf-eager", "hf-compile"):
        return HFBackend(spec["hf"], threads, spec.get("hf_dtype", "float32"), compile=engine == "hf-compile",
                         device=spec.get("device") or "cpu")
    if engine == "ort-genai":
        folder = build_ort_genai(spec["hf"], Path(spec["work_dir"]) / f"ort-genai-{spec['ort_precision']}",
                                 spec["ort_precision"])
        return OrtGenaiBackend(folder, threads, spec["ort_precision"])
    raise LlmcError(f"unknown engine {engine!r}; choose from llmc:PATH, {', '.join(PEER_ENGINES)}")
