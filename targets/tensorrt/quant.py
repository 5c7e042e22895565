"""llmc's quantized weights as blocked ``DequantizeLinear`` (opset 21+) for TensorRT.

TensorRT's ONNX parser takes ``DequantizeLinear`` on INT8/INT4 data with zero points that are
zero (or absent), and UINT8 only as a network input or output. llmc's
:class:`~llmc.compiler.weights.QuantizedTensor` holds unsigned codes ``q`` with

* symmetric: ``w = s * (q - 2**(bits-1))``, and
* asymmetric: ``w = s * q + offset`` (``offset`` a float per group, not an integer zero point).

Both are written with signed codes ``c = q - 2**(bits-1)``: flipping the top bit of every code
gives the two's-complement INT4 / INT8 value ``c`` exactly. The weight is stored transposed,
``[in, out]`` (the ``B`` of ``MatMul(x, B)``, blocks along its reduction axis), ONNX INT4
packing two codes per byte in flattened order (the even element in the low nibble);
scales are float32 ``[groups, out]`` (llmc's float16/bfloat16 scales cast exactly).

* INT4: blocked ``DequantizeLinear(c, s, axis=0, block_size=group_size)`` (opset 21); TensorRT's
  Dequantize layer takes 2-D block scales for INT4 only;
* INT8, one group per row: per-channel ``DequantizeLinear(c, s, axis=1)``;
* INT8 with smaller groups (TensorRT takes blocked scales for INT4 only):
  ``DequantizeLinear(c, 1.0) * s`` with ``s`` gathered to ``[in, out]``.

Each computes ``s * c`` in float32 from the same operands as llmc's own dequantization
``s * (q - 2**(bits-1))``: the same value, bit for bit. Asymmetric weights (``w = s * q +
offset``, ``offset`` a float, not an integer zero point) add two per-group terms gathered to
``[in, out]``: ``(s * c + s * 2**(bits-1)) + offset``. With float16/bfloat16 scales (llmc's
default, and GGUF's) ``s * c`` and ``s * 2**(bits-1)`` are exact in float32 (an 11- or 8-bit
significand times a small integer or a power of two), and so is their sum (its value ``s * q``
is representable), so the only rounding is the final ``+ offset``, exactly as in llmc's
``s * q + offset``: the same weights bit for bit. (Float32 scales can round once more.)

``W`` feeds ``MatMul(x, W)``. Quantized embedding tables are dequantized the same way and rows
are gathered from the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.packing import pack_codes, zero_point
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor
from llmc.targets.onnx.graph import GraphBuilder


def pack_int4_flat(codes: np.ndarray) -> np.ndarray:
    """Unsigned 4-bit values (any shape) packed two per byte in flattened order, low nibble first."""
    flat = np.asarray(codes, np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8)


def unpack_int4_flat(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4_flat` (the first ``count`` values)."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out[:count]


def transposed_codes(qt: QuantizedTensor) -> np.ndarray:
    """The signed codes ``q - 2**(bits-1)`` of ``W.T`` (``[in, out]``) as stored bytes."""
    signed = np.bitwise_xor(qt.unpacked(), np.uint8(qt.layout.zero_point))
    if qt.spec.bits == 8:
        return np.ascontiguousarray(signed.T)
    return pack_int4_flat(signed.T)


def codes_from_transposed(stored: np.ndarray, qt_shape: tuple[int, int], bits: int) -> np.ndarray:
    """llmc's packed unsigned ``[out, in]`` codes from :func:`transposed_codes` bytes."""
    out, inp = qt_shape
    if bits == 8:
        signed = np.asarray(stored, np.uint8).reshape(inp, out)
    else:
        signed = unpack_int4_flat(stored, inp * out).reshape(inp, out)
    return pack_codes(np.bitwise_xor(np.ascontiguousarray(signed.T), np.uint8(zero_point(bits))), bits)


class DqWeight:
    """The initializers of one quantized weight and its dequantized ``[in, out]`` float32 value."""

    def __init__(self, g: GraphBuilder, name: str, qt: QuantizedTensor) -> None:
        self.g = g
        self.qt = qt
        out, inp = qt.shape
        self.codes = g.weight(f"{name}.qdata", transposed_codes(qt))
        proto = g.initializers[-1]  # re-type the bytes: INT4 packs two per byte
        proto.data_type = TensorProto.INT4 if qt.spec.bits == 4 else TensorProto.INT8
        del proto.dims[:]
        proto.dims.extend([inp, out])
        self.groups = qt.scales.shape[1]
        scales = np.ascontiguousarray(qt.scales.astype(np.float32).T)  # [groups, out]
        self.scales = g.weight(f"{name}.scales", scales[0] if self.per_channel else scales)
        self.offsets = None
        if qt.offsets is not None:
            self.offsets = g.weight(f"{name}.offsets", np.ascontiguousarray(qt.offsets.astype(np.float32).T))
        self._value: str | None = None

    @property
    def per_channel(self) -> bool:
        """INT8 with one group per row: per-channel scales ``[out]``."""
        return self.qt.spec.bits == 8 and self.groups == 1

    def record(self) -> dict[str, Any]:
        """How to read the weight back from the data file (see :func:`read_dq_weight`)."""
        qt = self.qt
        return {"kind": "quant", "quant": qt.spec.describe(), "scale_dtype": qt.spec.scale_dtype,
                "shape": list(qt.shape), "codes": self.codes, "scales": self.scales, "offsets": self.offsets,
                "scales_dtype": qt.scales.dtype.name,
                "offsets_dtype": None if qt.offsets is None else qt.offsets.dtype.name}

    def _per_row(self, groupwise: str) -> str:
        """A ``[groups, out]`` tensor repeated to ``[in, out]`` (row ``k`` takes group ``k // group_size``)."""
        rows = self.g.const(np.arange(self.qt.shape[1]) // self.qt.spec.group_size, np.int64, "group_of_row")
        return self.g.one("Gather", [groupwise, rows], axis=0)

    def value(self) -> str:
        """The float32 weight ``[in, out]`` (built once, shared by every use)."""
        if self._value is not None:
            return self._value
        g, spec = self.g, self.qt.spec
        scales = self.scales
        if spec.bits == 4:
            w = g.one("DequantizeLinear", [self.codes, scales], axis=0, block_size=spec.group_size, hint="dq")
        elif self.per_channel:
            w = g.one("DequantizeLinear", [self.codes, scales], axis=1, hint="dq")
            scales = g.one("Unsqueeze", [scales, g.const([0])])  # [1, out] for the asymmetric shift below
        else:
            ints = g.one("DequantizeLinear", [self.codes, g.const(1.0, np.float32, "unit_scale")], hint="dq")
            w = g.one("Mul", [ints, self._per_row(scales)])
        if self.offsets is not None:
            shift = g.one("Mul", [scales, g.const(float(self.qt.layout.zero_point), np.float32)])
            w = g.one("Add", [w, shift if self.per_channel else self._per_row(shift)])  # exactly s * q
            w = g.one("Add", [w, self._per_row(self.offsets)], hint="dq_asym")
        self._value = w
        return w


def read_dq_weight(record: dict[str, Any], tensor: Any) -> QuantizedTensor:
    """Rebuild llmc's :class:`QuantizedTensor` from the initializers (``tensor(name) -> array``)."""
    spec = QuantSpec.parse(record["quant"], record["scale_dtype"])
    out, inp = record["shape"]
    codes = codes_from_transposed(tensor(record["codes"]), (out, inp), spec.bits)
    scales = np.ascontiguousarray(tensor(record["scales"]).reshape(-1, out).T)
    scales = scales.astype(NUMPY_DTYPES[record["scales_dtype"]])
    offsets = None
    if record["offsets"] is not None:
        offsets = np.ascontiguousarray(tensor(record["offsets"]).T).astype(NUMPY_DTYPES[record["offsets_dtype"]])
    return QuantizedTensor(spec, (out, inp), codes, scales, offsets)
