"""Weights beside the IR: plain arrays or group-quantized tensors, loaded lazily by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from llmc.compiler.ggml_blocks import BlockFormat, block_format, decode
from llmc.compiler.ggml_blocks import dequantize as ggml_dequantize
from llmc.compiler.ir.types import QuantSpec

NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
}


def dtype_name(dtype: np.dtype) -> str:
    """IR dtype name of a numpy dtype."""
    for name, np_dtype in NUMPY_DTYPES.items():
        if np_dtype == dtype:
            return name
    raise ValueError(f"numpy dtype {dtype} has no IR name")


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A 2-D weight ``[out, in]`` stored group-quantized as described by :class:`QuantSpec`.

    ``qdata`` is uint8 ``[out, in]`` (8-bit) or ``[out, in // 2]`` (4-bit, low nibble first);
    ``scales`` and ``offsets`` are ``[out, ceil(in / group_size)]``; ``offsets`` is None for
    symmetric specs. The last group may be shorter than ``group_size``.

    A spec with ``ggml`` set (:meth:`QuantSpec.for_ggml`, made by :meth:`from_ggml`) holds a
    GGUF tensor as stored instead: ``qdata`` is its blocks, uint8 ``[out, row bytes]``
    (:mod:`llmc.compiler.ggml_blocks`), ``scales`` is empty (``[out, 0]``: the blocks carry
    their scales) and ``offsets`` is None.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    qdata: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None

    @classmethod
    def from_ggml(cls, ggml_type: str, shape: tuple[int, int], blocks: np.ndarray) -> QuantizedTensor:
        """A GGUF tensor of ggml type ``ggml_type`` kept as its stored ``blocks``."""
        spec = QuantSpec.for_ggml(ggml_type)
        out, inp = shape
        raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out, block_format(ggml_type).row_bytes(inp))
        return cls(spec, (out, inp), raw, np.zeros((out, 0), dtype=np.float16))

    @property
    def ggml_format(self) -> BlockFormat | None:
        """The block format when this holds GGUF blocks as stored, else None."""
        return None if self.spec.ggml is None else block_format(self.spec.ggml)

    def __post_init__(self) -> None:
        out, inp = self.shape
        if self.spec.ggml is not None:
            row = block_format(self.spec.ggml).row_bytes(inp)
            if self.qdata.dtype != np.uint8 or self.qdata.shape != (out, row):
                raise ValueError(f"{self.spec.ggml} blocks must be uint8 {(out, row)}, got "
                                 f"{self.qdata.dtype} {self.qdata.shape}")
            if self.scales.shape != (out, 0) or self.offsets is not None:
                raise ValueError("ggml block tensors keep their scales in the blocks (scales [out, 0], no offsets)")
            return
        groups = -(-inp // self.spec.group_size)
        packed = inp if self.spec.bits == 8 else inp // 2
        if self.spec.bits == 4 and inp % 2:
            raise ValueError(f"4-bit weights need an even input dim, got {inp}")
        if self.qdata.dtype != np.uint8 or self.qdata.shape != (out, packed):
            raise ValueError(f"qdata must be uint8 {(out, packed)}, got {self.qdata.dtype} {self.qdata.shape}")
        if self.scales.shape != (out, groups):
            raise ValueError(f"scales must be {(out, groups)}, got {self.scales.shape}")
        if self.spec.symmetric != (self.offsets is None):
            raise ValueError("offsets must be given exactly when the spec is asymmetric")
        if self.offsets is not None and self.offsets.shape != (out, groups):
            raise ValueError(f"offsets must be {(out, groups)}, got {self.offsets.shape}")

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.qdata.nbytes + self.scales.nbytes + extra

    def unpacked(self) -> np.ndarray:
        """The unsigned integer codes as uint8 ``[out, in]``."""
        fmt = self.ggml_format
        if fmt is not None:
            return decode(self.qdata, fmt, self.shape).codes
        return unpack_codes(self.qdata, self.spec.bits)

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The float weight ``[out, in]``; computed in float32, then cast (ggml blocks: bit-identical
        to ``gguf.quants.dequantize``)."""
        fmt = self.ggml_format
        if fmt is not None:
            return ggml_dequantize(self.qdata, fmt, self.shape).astype(dtype, copy=False)
        codes = self.unpacked().astype(np.float32)
        group = self.spec.group_size
        inp = self.shape[1]
        scales = np.repeat(self.scales.astype(np.float32), group, axis=1)[:, :inp]
        if self.spec.symmetric:
            w = scales * (codes - float(2 ** (self.spec.bits - 1)))
        else:
            assert self.offsets is not None
            offsets = np.repeat(self.offsets.astype(np.float32), group, axis=1)[:, :inp]
            w = scales * codes + offsets
        return w.astype(dtype, copy=False)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes ``[out, in]`` (values < 2**bits) into uint8 storage."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if codes.shape[-1] % 2:
        raise ValueError("4-bit packing needs an even number of columns")
    low, high = codes[..., 0::2], codes[..., 1::2]
    return np.ascontiguousarray((low & 0x0F) | ((high & 0x0F) << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


Weight = np.ndarray | QuantizedTensor
Loader = Callable[[], Weight]


class WeightStore(MutableMapping[str, Weight]):
    """Name -> weight. Values may be given as loaders, called once on first access."""

    def __init__(self) -> None:
        self._values: dict[str, Weight | Loader] = {}

    def set_lazy(self, name: str, loader: Loader) -> None:
        self._values[name] = loader

    def __getitem__(self, name: str) -> Weight:
        value = self._values[name]
        if callable(value):
            value = value()
            self._values[name] = value
        return value

    def __setitem__(self, name: str, value: Weight) -> None:
        self._values[name] = value

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def as_float(weight: Weight, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A float view of any weight (dequantizing if needed)."""
    if isinstance(weight, QuantizedTensor):
        return weight.dequantize(dtype)
    return np.asarray(weight).astype(dtype, copy=False)
