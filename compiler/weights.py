"""Weights beside the IR: plain arrays or group-quantized tensors, loaded lazily by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from llmc.compiler.ggml_blocks import BlockFormat, block_format
from llmc.compiler.ggml_blocks import dequantize as ggml_dequantize
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.packing import BlockLayout, GroupLayout, layout_for, pack_codes, unpack_codes

__all__ = ["NUMPY_DTYPES", "Loader", "QuantizedTensor", "Weight", "WeightStore", "as_float", "dtype_name",
           "pack_codes", "unpack_codes"]

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
    """A 2-D weight ``[out, in]`` stored group-quantized as described by :class:`QuantSpec`, in
    llmc's packed layout (:mod:`llmc.compiler.packing`): ``qdata`` uint8 ``[out, in]`` (8-bit)
    or ``[out, in // 2]`` (4-bit, low nibble first); ``scales`` and ``offsets`` ``[out,
    ceil(in / group_size)]``; ``offsets`` is None for symmetric specs. The last group may be
    shorter than ``group_size``.

    A spec with ``ggml`` set (:meth:`QuantSpec.for_ggml`, made by :meth:`from_ggml`) holds a
    GGUF tensor as stored instead (:class:`~llmc.compiler.packing.BlockLayout`): ``qdata`` is its
    blocks, uint8 ``[out, row bytes]`` (:mod:`llmc.compiler.ggml_blocks`), ``scales`` is empty
    (``[out, 0]``: the blocks carry their scales) and ``offsets`` is None.
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
        self.layout.check(self.qdata, self.scales, self.offsets)

    @property
    def layout(self) -> GroupLayout | BlockLayout:
        """The packed layout of this weight (part names, shapes, dtypes, unpacking)."""
        return layout_for(self.spec, self.shape)

    def part(self, name: str) -> np.ndarray:
        """One stored array by its layout name (``qdata``, ``scales``, ``offsets``)."""
        if name not in self.layout.part_names:
            raise KeyError(f"a {self.spec.describe()} weight has no part {name!r}; it has {self.layout.part_names}")
        array = getattr(self, name)
        assert array is not None
        return array

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.qdata.nbytes + self.scales.nbytes + extra

    def unpacked(self) -> np.ndarray:
        """The unsigned integer codes as uint8 ``[out, in]``."""
        return self.layout.unpack(self.qdata)

    def dequantize(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """The float weight ``[out, in]``; computed in float32, then cast (GGUF blocks: bit-identical
        to ``gguf.quants.dequantize``)."""
        fmt = self.ggml_format
        if fmt is not None:
            return ggml_dequantize(self.qdata, fmt, self.shape).astype(dtype, copy=False)
        codes = self.unpacked().astype(np.float32)
        group = self.spec.group_size
        inp = self.shape[1]
        scales = np.repeat(self.scales.astype(np.float32), group, axis=1)[:, :inp]
        if self.spec.symmetric:
            w = scales * (codes - float(self.layout.zero_point))
        else:
            assert self.offsets is not None
            offsets = np.repeat(self.offsets.astype(np.float32), group, axis=1)[:, :inp]
            w = scales * codes + offsets
        return w.astype(dtype, copy=False)


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
