"""llmc's packed-weight layout: how a :class:`~llmc.compiler.weights.QuantizedTensor` stores a
group-quantized ``[out, in]`` weight. Every reader and writer of the parts (the tensor's own
checks and dequantization, the torch kernels, tvm's VM params, the ONNX and TensorRT
initializers) takes the facts from here.

The group-wise layout (:class:`GroupLayout`, every :class:`QuantSpec` today):

* ``qdata``: uint8 ``[out, in]`` for 8-bit codes, ``[out, in / 2]`` for 4-bit codes (two per
  byte along the input dim, the low nibble holding the even index);
* ``scales``: ``[out, groups]`` in the spec's scale dtype, ``groups = ceil(in / group_size)``
  (the last group may be shorter);
* ``offsets``: ``[out, groups]``, asymmetric specs only.

``w[o, i] = scales[o, g] * (q[o, i] - zero_point)`` (symmetric, ``zero_point = 2**(bits-1)``)
or ``scales[o, g] * q[o, i] + offsets[o, g]`` (asymmetric), with ``g = i // group_size``.

:func:`layout_for` picks a spec's layout. A new packed format adds a layout class with the same
interface (``parts``, ``check``, ``unpack``) and a branch in :func:`layout_for`; code that only
moves parts around (tvm's param slots, artifact records) then works unchanged. GGUF tensors kept
in their own block format (a spec with ``ggml`` set) have :class:`BlockLayout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.compiler.ir.types import QuantSpec

PART_ORDER = ("qdata", "scales", "offsets")
"""The parts of a quantized weight, in the order targets pass them to kernels."""

NIBBLE_MASK = 0x0F
NIBBLE_BITS = 4


@dataclass(frozen=True)
class TensorPart:
    """One stored array of a quantized weight: its name, shape and IR dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class GroupLayout:
    """The group-wise layout of one quantized weight of logical shape ``[out, in]``."""

    spec: QuantSpec
    shape: tuple[int, int]

    @property
    def groups(self) -> int:
        """Groups per row: ``ceil(in / group_size)``."""
        return -(-self.shape[1] // self.spec.group_size)

    @property
    def codes_per_byte(self) -> int:
        """2 for 4-bit codes (low nibble first), 1 for 8-bit codes."""
        return 2 if self.spec.bits == 4 else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of ``qdata`` per output row."""
        return self.shape[1] // self.codes_per_byte

    @property
    def group_bytes(self) -> int:
        """Bytes of ``qdata`` per whole group of a row."""
        return self.spec.group_size // self.codes_per_byte

    @property
    def zero_point(self) -> int:
        """The code that means 0 in a symmetric spec (``2**(bits-1)``)."""
        return zero_point(self.spec.bits)

    @property
    def part_names(self) -> tuple[str, ...]:
        return PART_ORDER if not self.spec.symmetric else PART_ORDER[:2]

    def parts(self) -> tuple[TensorPart, ...]:
        """The stored arrays, in :data:`PART_ORDER`."""
        out = self.shape[0]
        return tuple(TensorPart(name, (out, self.row_bytes) if name == "qdata" else (out, self.groups),
                                "uint8" if name == "qdata" else self.spec.scale_dtype)
                     for name in self.part_names)

    def check(self, qdata: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> None:
        """Raise ValueError unless the arrays have this layout's shapes (and ``qdata`` is uint8)."""
        out, inp = self.shape
        if self.spec.bits == 4 and inp % 2:
            raise ValueError(f"4-bit weights need an even input dim, got {inp}")
        if qdata.dtype != np.uint8 or qdata.shape != (out, self.row_bytes):
            raise ValueError(f"qdata must be uint8 {(out, self.row_bytes)}, got {qdata.dtype} {qdata.shape}")
        if scales.shape != (out, self.groups):
            raise ValueError(f"scales must be {(out, self.groups)}, got {scales.shape}")
        if self.spec.symmetric != (offsets is None):
            raise ValueError("offsets must be given exactly when the spec is asymmetric")
        if offsets is not None and offsets.shape != (out, self.groups):
            raise ValueError(f"offsets must be {(out, self.groups)}, got {offsets.shape}")

    def unpack(self, qdata: Any, stack: Callable[..., Any] = np.stack) -> Any:
        """The unsigned codes ``[..., in]`` of ``qdata`` (a numpy array, or with ``stack=torch.stack`` a tensor)."""
        return unpack_codes(qdata, self.spec.bits, stack)


@dataclass(frozen=True)
class BlockLayout:
    """A GGUF tensor kept in its own block format (:data:`llmc.compiler.ggml_blocks.FORMATS`): one
    part, ``qdata``, uint8 ``[out, row bytes]``, the blocks as stored, each carrying its scales;
    ``scales`` is empty (``[out, 0]``) and there are no offsets. :mod:`llmc.compiler.ggml_blocks`
    decodes it exactly."""

    spec: QuantSpec
    shape: tuple[int, int]

    @property
    def row_bytes(self) -> int:
        from llmc.compiler.ggml_blocks import block_format

        assert self.spec.ggml is not None
        return block_format(self.spec.ggml).row_bytes(self.shape[1])

    @property
    def part_names(self) -> tuple[str, ...]:
        return PART_ORDER[:1]

    def parts(self) -> tuple[TensorPart, ...]:
        return (TensorPart("qdata", (self.shape[0], self.row_bytes), "uint8"),)

    def check(self, qdata: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> None:
        """Raise ValueError unless ``qdata`` holds whole blocks of this shape, ``scales`` is ``[out, 0]``
        and ``offsets`` is None."""
        out = self.shape[0]
        if qdata.dtype != np.uint8 or qdata.shape != (out, self.row_bytes):
            raise ValueError(f"{self.spec.ggml} blocks must be uint8 {(out, self.row_bytes)}, got "
                             f"{qdata.dtype} {qdata.shape}")
        if scales.shape != (out, 0) or offsets is not None:
            raise ValueError("GGUF block tensors keep their scales in the blocks (scales [out, 0], no offsets)")

    def unpack(self, qdata: Any, stack: Callable[..., Any] = np.stack) -> Any:
        """The unsigned codes ``[out, in]`` of the blocks (numpy only)."""
        from llmc.compiler.ggml_blocks import block_format, decode

        assert self.spec.ggml is not None
        return decode(np.asarray(qdata), block_format(self.spec.ggml), self.shape).codes


def zero_point(bits: int) -> int:
    """The code meaning 0 for ``bits``-bit symmetric codes: ``2**(bits-1)``, the top bit (XOR with it
    turns unsigned ``q`` into the two's-complement ``q - 2**(bits-1)`` and back)."""
    return 2 ** (bits - 1)


def layout_for(spec: QuantSpec, shape: tuple[int, int]) -> GroupLayout | BlockLayout:
    """The packed layout of a weight of ``shape`` quantized as ``spec`` (GGUF blocks: :class:`BlockLayout`)."""
    if spec.ggml is not None:
        return BlockLayout(spec, (int(shape[0]), int(shape[1])))
    return GroupLayout(spec, (int(shape[0]), int(shape[1])))


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
    return np.ascontiguousarray((low & NIBBLE_MASK) | ((high & NIBBLE_MASK) << NIBBLE_BITS)).astype(np.uint8)


def unpack_codes(packed: Any, bits: int, stack: Callable[..., Any] = np.stack) -> Any:
    """Inverse of :func:`pack_codes`: codes ``[..., 2 * bytes]`` from 4-bit ``packed`` (8-bit: as is).

    Works on numpy arrays and, with ``stack=torch.stack``, on uint8 torch tensors."""
    if bits == 8:
        return packed
    low, high = packed & NIBBLE_MASK, packed >> NIBBLE_BITS
    return stack((low, high), -1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
