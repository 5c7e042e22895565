"""A GGUF file as editable structure (header counts, key/values, tensor infos, data), for
tests that build hostile files: every count and length can be made to lie."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from llmc.compiler.frontends.gguf_reader import SCALAR_FORMATS, BoundedGGUFReader

V = GGUFValueType


@dataclass
class KV:
    key: str
    vtype: int
    value: Any
    item_type: int | None = None
    """For arrays: the element type."""
    count: int | None = None
    """For arrays and strings: the count/length written (None: the true one)."""


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int
    n_dims: int | None = None
    """The dimension count written (None: len(dims))."""


@dataclass
class GGUFDoc:
    version: int = 3
    kvs: list[KV] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    tensor_count: int | None = None
    kv_count: int | None = None
    magic: bytes = b"GGUF"

    @classmethod
    def read(cls, path: Path) -> GGUFDoc:
        """The structure of a valid GGUF file (as llmc's reader sees it)."""
        reader = BoundedGGUFReader(path)
        kvs = []
        for name, f in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            vtype = int(f.types[0])
            item = int(f.types[1]) if vtype == V.ARRAY else None
            value = f.contents()
            kvs.append(KV(name, vtype, value, item))
        data = bytes(reader.data[reader.data_offset:])
        tensors = [TensorInfo(t.name, [int(d) for d in t.shape], int(t.tensor_type), t.data_offset - reader.data_offset)
                   for t in reader.tensors]
        return cls(int(reader.fields["GGUF.version"].contents()), kvs, tensors, data, int(reader.alignment))

    def __repr__(self) -> str:
        return (f"GGUFDoc(v{self.version}, {len(self.kvs)} kvs {[k.key for k in self.kvs][:40]}, "
                f"tensors {[(t.name, t.dims, t.ggml_type) for t in self.tensors][:6]}..., counts "
                f"{self.tensor_count}/{self.kv_count})")

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def set(self, key: str, vtype: int, value: Any, item_type: int | None = None) -> GGUFDoc:
        """A copy with ``key`` set (added when absent)."""
        doc = replace(self, kvs=[k for k in self.kvs if k.key != key] + [KV(key, vtype, value, item_type)])
        return doc

    def drop(self, key: str) -> GGUFDoc:
        return replace(self, kvs=[k for k in self.kvs if k.key != key])

    def to_bytes(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack("<Q", len(self.tensors) if self.tensor_count is None else self.tensor_count)
        out += struct.pack("<Q", len(self.kvs) if self.kv_count is None else self.kv_count)
        for kv in self.kvs:
            out += _string(kv.key.encode())
            out += struct.pack("<I", kv.vtype)
            out += _value(kv.vtype, kv.value, kv.item_type, kv.count)
        for t in self.tensors:
            out += _string(t.name.encode())
            out += struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.ggml_type, t.offset)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out) + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def _string(raw: bytes, count: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if count is None else count) + raw


def _value(vtype: int, value: Any, item_type: int | None, count: int | None) -> bytes:
    if vtype == V.STRING:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
        return _string(raw, count)
    if vtype == V.ARRAY:
        assert item_type is not None
        items = list(value)
        head = struct.pack("<IQ", item_type, len(items) if count is None else count)
        return head + b"".join(_value(item_type, v, None, None) for v in items)
    fmt = SCALAR_FORMATS.get(V(vtype)) if vtype in {int(t) for t in V} else None
    if fmt is None:  # an unknown type: any 8 bytes
        return struct.pack("<Q", int(value) & (2**64 - 1)) if isinstance(value, int) else b"\x01" * 8
    if fmt in "fd":
        return struct.pack("<" + fmt, float(value))
    if fmt == "?":
        return struct.pack("<B", int(value) & 0xFF)
    bits = struct.calcsize(fmt) * 8
    signed = fmt.islower()
    number = int(value)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return struct.pack("<" + fmt, min(max(number, lo), hi))
