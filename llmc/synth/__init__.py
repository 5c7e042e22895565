"""Synthetic models: seeded random weights with the exact shapes of real models.

For performance work where real weights are not at hand. ``llmc synth --preset llama-3.2-1b``
writes a Hugging Face folder (config.json, safetensors, tokenizer.json) or a GGUF that both
llmc and llama.cpp load; one seed gives the same model in both formats.

This lives beside the CLI in ``llmc`` rather than in ``llmc.compiler``: it makes *inputs* for the
compiler (and for peer tools), it is not a stage of compilation.
"""

from __future__ import annotations

from pathlib import Path

from llmc.compiler.errors import InputError
from llmc.synth.presets import PRESETS, Preset, get_preset
from llmc.synth.weights import STORAGE_DTYPES, param_count, storage_dtype

FORMATS = ("safetensors", "gguf")

__all__ = ["FORMATS", "PRESETS", "STORAGE_DTYPES", "Preset", "get_preset", "param_count", "synthesize"]


def synthesize(preset: str, out: str | Path, fmt: str = "safetensors", seed: int = 0,
               dtype: str = "float16") -> Path:
    """Write the synthetic ``preset`` model; returns the folder or ``.gguf`` file written.

    For ``gguf``, ``out`` may be the file (ending in ``.gguf``) or a folder to put
    ``<preset>.gguf`` in. An existing output is replaced only when ``llmc synth`` wrote it (else
    :class:`InputError`, before anything is written)."""
    from llmc.synth.writers import write_gguf, write_hf

    p = get_preset(preset)
    storage_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"synth seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    if fmt == "safetensors":
        return write_hf(p, out, seed, dtype)
    if fmt == "gguf":
        path = out if out.suffix == ".gguf" else out / f"{p.name}.gguf"
        return write_gguf(p, path, seed, dtype)
    raise InputError(f"unknown synth format {fmt!r}; choose from {', '.join(FORMATS)}")
