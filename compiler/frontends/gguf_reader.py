"""Opening a GGUF file (llama.cpp's format, v2/v3): the memory-mapped reader and typed metadata access.

The file is memory-mapped through ``gguf.GGUFReader``; failures become :class:`InputError` /
:class:`UnsupportedError` naming the file, the key or the tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFReader

from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.frontends.gguf_tensors import DEQUANTIZED_TYPES


class _Reader(GGUFReader):
    """GGUFReader that names the tensor when its ggml type is unknown to the gguf package."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        known = {int(t) for t in GGMLQuantizationType}
        for field in fields:
            raw = int(field.parts[4][0])
            if raw not in known:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                raise UnsupportedError(
                    f"tensor {name!r} has unknown ggml type {raw}; supported: "
                    + ", ".join(t.name for t in DEQUANTIZED_TYPES)
                )
        super()._build_tensors(start_offs, fields)


def open_gguf(path: Path) -> GGUFReader:
    """Memory-map a GGUF file, turning the reader's failures into :class:`InputError`."""
    try:
        reader = _Reader(path, "r")
    except UnsupportedError as exc:
        raise UnsupportedError(f"{path}: {exc}") from exc
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError) as exc:
        text = str(exc).lower()
        if "magic" in text:
            hint = "bad magic: not a GGUF file"
        elif "version" in text:
            hint = "llmc reads GGUF v2 and v3"
        else:
            hint = "truncated or corrupt?"
        raise InputError(f"{path}: cannot read GGUF file: {exc} ({hint})") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(f"{path}: tensor {t.name!r} ends past the end of the file (truncated?)")
    return reader


class Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: metadata key {key!r} cannot be read: {exc}") from exc

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise InputError(f"{self.path}: missing required metadata key {key!r}")
        return self.get(key)
