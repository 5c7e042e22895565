"""Quantized weights in the ONNX graph, keeping llmc's packing exactly.

llmc's :class:`~llmc.compiler.weights.QuantizedTensor` stores codes ``[out, in]`` (4-bit: two
per byte, low nibble = even index), per-group scales, and offsets when asymmetric:
``w = s * (q - 2**(bits-1))`` or ``w = s * q + offset``. The codes are stored in the
*blocked* layout ``[out, k_blocks, block_bytes]`` that ``MatMulNBits`` reads as ``B`` (the same
bytes, the last block zero-padded when ``in`` is not a multiple of the group); scales become
float32 (``MatMulNBits`` wants the activation type; the cast is exact).

* Symmetric: ``MatMulNBits(x, B, scales)``; its implied zero point 8 (4-bit) / 128 (8-bit) is
  llmc's ``2**(bits-1)``.
* Asymmetric: ``MatMulNBits`` with zero points 0 computes ``x @ (s * q).T``; the offsets add
  ``sum_g (sum_{k in g} x_k) * offset[:, g]``, a ``[tokens, groups] @ [groups, out]`` product.
  This is exact algebra on the stored values. (Float zero points ``-offset/scale`` would round,
  are rejected for 8-bit on the CPU EP, and measured ~7x slower than uint8 zero points for 4-bit.)
* Group sizes ``MatMulNBits`` does not take (not a power of two >= 16) and embedding rows are
  dequantized in the graph with standard ops (``s * (q - z)`` / ``s * q + o`` in float32, the same
  arithmetic as the torch target).
* 8-bit weights use ``MatMulNBits`` only with ``accuracy_level=4`` (int8 activations). At level 0
  ONNX Runtime 1.32's CPU kernel has no float32 path for 8 bits and re-dequantizes the whole weight
  on every call (measured ~100x slower than the 4-bit kernel on SmolLM2's 49152x576 head), so they
  are dequantized in the graph instead; ONNX Runtime folds that into a float32 initializer when the
  session loads (exact; 4 bytes per weight in memory, the file keeps llmc's 8-bit packing).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.packing import NIBBLE_BITS, NIBBLE_MASK, layout_for
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor
from llmc.targets.onnx.graph import MS_DOMAIN, GraphBuilder


def blocked_codes(qt: QuantizedTensor) -> np.ndarray:
    """The packed codes as ``[out, k_blocks, block_bytes]`` (MatMulNBits' ``B``), zero-padded."""
    layout = qt.layout
    out = qt.shape[0]
    blocks, per_block = layout.groups, layout.group_bytes
    data = qt.qdata
    padded = blocks * per_block
    if data.shape[1] != padded:
        data = np.concatenate([data, np.zeros((out, padded - data.shape[1]), np.uint8)], axis=1)
    return data.reshape(out, blocks, per_block)


def matmulnbits_ok(spec: QuantSpec) -> bool:
    """Whether ``MatMulNBits`` takes this group size (a power of two, at least 16)."""
    g = spec.group_size
    return g >= 16 and g & (g - 1) == 0


class QuantTensors:
    """The initializers of one quantized weight (created once, shared by every use)."""

    def __init__(self, g: GraphBuilder, name: str, qt: QuantizedTensor) -> None:
        self.qt = qt
        self.spec = qt.spec
        self.codes = g.weight(f"{name}.qdata", blocked_codes(qt))
        self.scales = g.weight(f"{name}.scales", qt.scales.astype(np.float32))
        self.offsets = None if qt.offsets is None else g.weight(f"{name}.offsets", qt.offsets.astype(np.float32))
        self._zero_points: str | None = None
        self._dequantized: str | None = None
        self.g = g

    def record(self) -> dict[str, Any]:
        """How to read the weight back (see :func:`read_quantized`)."""
        return {"kind": "quant", "quant": self.spec.describe(), "scale_dtype": self.spec.scale_dtype,
                "shape": list(self.qt.shape), "codes": self.codes, "scales": self.scales, "offsets": self.offsets,
                "scales_dtype": self.qt.scales.dtype.name,
                "offsets_dtype": None if self.qt.offsets is None else self.qt.offsets.dtype.name}

    def zero_points(self) -> str:
        """uint8 zero points of 0 (asymmetric weights: the offsets are added separately)."""
        if self._zero_points is None:
            out, blocks = self.qt.scales.shape
            cols = -(-blocks // 2) if self.spec.bits == 4 else blocks
            self._zero_points = self.g.const(np.zeros((out, cols), np.uint8), np.uint8, "zero_points")
        return self._zero_points

    def dequantize(self, codes: str, scales: str, offsets: str | None) -> str:
        """Float32 ``[rows, in]`` from blocked codes ``[rows, blocks, bytes]`` and their scales."""
        g, spec = self.g, self.spec
        if spec.bits == 4:  # llmc's layout: the low nibble holds the even index
            low = g.one("BitwiseAnd", [codes, g.const(NIBBLE_MASK, np.uint8)])
            high = g.one("BitShift", [codes, g.const(NIBBLE_BITS, np.uint8)], direction="RIGHT")
            axis = g.const([-1])
            pairs = g.one("Concat", [g.one("Unsqueeze", [low, axis]), g.one("Unsqueeze", [high, axis])], axis=-1)
            codes = g.one("Reshape", [pairs, g.const([0, 0, spec.group_size])])
        values = g.one("Cast", [codes], to=1)  # [rows, blocks, group]
        scale = g.one("Unsqueeze", [scales, g.const([-1])])
        if offsets is None:
            values = g.one("Sub", [values, g.const(float(self.qt.layout.zero_point), np.float32)])
            w = g.one("Mul", [scale, values])
        else:
            w = g.one("Add", [g.one("Mul", [scale, values]), g.one("Unsqueeze", [offsets, g.const([-1])])])
        flat = g.one("Reshape", [w, g.const([0, -1])])
        return g.one("Slice", [flat, g.const([0]), g.const([self.qt.shape[1]]), g.const([1])])

    def rows(self, ids: str) -> str:
        """Dequantized rows ``ids`` (an embedding lookup)."""
        g = self.g
        codes = g.one("Gather", [self.codes, ids], axis=0)
        scales = g.one("Gather", [self.scales, ids], axis=0)
        offsets = None if self.offsets is None else g.one("Gather", [self.offsets, ids], axis=0)
        return self.dequantize(codes, scales, offsets)

    def uses_matmulnbits(self, accuracy_level: int) -> bool:
        """MatMulNBits for 4-bit weights, and for 8-bit ones when activations are int8 (level 4)."""
        return matmulnbits_ok(self.spec) and (self.spec.bits == 4 or accuracy_level == 4)

    def linear(self, x: str, accuracy_level: int) -> str:
        """``x @ w.T`` for ``x [tokens, in]``."""
        g, spec = self.g, self.spec
        out, inp = self.qt.shape
        if not self.uses_matmulnbits(accuracy_level):
            if self._dequantized is None:
                self._dequantized = self.dequantize(self.codes, self.scales, self.offsets)
            return g.one("Gemm", [x, self._dequantized], transB=1)
        inputs = [x, self.codes, self.scales]
        if self.offsets is not None:
            inputs.append(self.zero_points())
        y = g.one("MatMulNBits", inputs, domain=MS_DOMAIN, K=inp, N=out, bits=spec.bits,
                  block_size=spec.group_size, accuracy_level=accuracy_level)
        if self.offsets is None:
            return y
        blocks = self.qt.scales.shape[1]
        padded = blocks * spec.group_size
        if padded != inp:
            x = g.one("Pad", [x, g.const([0, 0, 0, padded - inp])])
        grouped = g.one("Reshape", [x, g.const([0, blocks, spec.group_size])])
        sums = g.one("ReduceSum", [grouped, g.const([2])], keepdims=0)  # [tokens, blocks]
        return g.one("Add", [y, g.one("Gemm", [sums, self.offsets], transB=1)])


def read_quantized(record: dict[str, Any], tensor: Any) -> QuantizedTensor:
    """Rebuild the :class:`QuantizedTensor` from its initializers (``tensor(name) -> array``)."""
    spec = QuantSpec.parse(record["quant"], record["scale_dtype"])
    out, inp = record["shape"]
    codes = tensor(record["codes"]).reshape(out, -1)[:, :layout_for(spec, (out, inp)).row_bytes]
    scales = tensor(record["scales"]).astype(NUMPY_DTYPES[record["scales_dtype"]])
    offsets = None
    if record["offsets"] is not None:
        offsets = tensor(record["offsets"]).astype(NUMPY_DTYPES[record["offsets_dtype"]])
    return QuantizedTensor(spec, (out, inp), np.ascontiguousarray(codes), scales, offsets)
