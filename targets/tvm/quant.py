"""Group-quantized weights in TVM: tensor expressions that dequantize inside the matmul.

llmc's one quantized form (:class:`llmc.compiler.weights.QuantizedTensor`): uint8 codes
``[out, in]`` (8-bit) or ``[out, in // 2]`` (4-bit, low nibble = even input index), per-group
``scales`` and (asymmetric only) ``offsets`` of shape ``[out, ceil(in / group)]``;
``w = scale * (q - 2**(bits-1))`` when symmetric, else ``w = scale * q + offset``.

Each quantized matmul is one TE operator holding two stages, the dequantization of the weight
and the reduction that reads it, so Relax emits them as one PrimFunc: TVM's schedules (dlight
``GEMV``/``Matmul`` on GPUs) inline the dequantization into the matmul loop, and the float
weight is never stored in memory between kernels.
"""

from __future__ import annotations

from typing import Any

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.packing import NIBBLE_BITS, NIBBLE_MASK, zero_point


def dequant_expr(te_qdata: Any, te_scales: Any, te_offsets: Any, spec: QuantSpec, row: Any, col: Any) -> Any:
    """The float32 value of weight element ``[row, col]`` as a TIR expression."""
    from tvm import tirx

    if spec.bits == 8:
        code = te_qdata[row, col].astype("int32")
    else:  # two codes a byte, the even index in the low nibble
        byte = te_qdata[row, col // 2].astype("int32")
        code = tirx.bitwise_and(tirx.shift_right(byte, (col % 2 * NIBBLE_BITS).astype("int32")),
                                tirx.const(NIBBLE_MASK, "int32"))
    scale = te_scales[row, col // spec.group_size].astype("float32")
    if spec.symmetric:
        return scale * (code.astype("float32") - tirx.const(float(zero_point(spec.bits)), "float32"))
    offset = te_offsets[row, col // spec.group_size].astype("float32")
    return scale * code.astype("float32") + offset


def _nibble_pair_term(x_te: Any, qdata: Any, scales: Any, offsets: Any, spec: QuantSpec, t: Any, o: Any,
                      k: Any) -> Any:
    """``x[t, 2k] * w[o, 2k] + x[t, 2k+1] * w[o, 2k+1]`` from one byte of 4-bit codes."""
    from tvm import tirx

    byte = qdata[o, k].astype("int32")
    codes = (tirx.bitwise_and(byte, tirx.const(NIBBLE_MASK, "int32")),
             tirx.shift_right(byte, tirx.const(NIBBLE_BITS, "int32")))
    scale = scales[o, k * 2 // spec.group_size].astype("float32")
    if spec.symmetric:
        half = tirx.const(float(zero_point(spec.bits)), "float32")
        w = [scale * (c.astype("float32") - half) for c in codes]
    else:
        offset = offsets[o, k * 2 // spec.group_size].astype("float32")
        w = [scale * c.astype("float32") + offset for c in codes]
    return x_te[t, 2 * k].astype("float32") * w[0] + x_te[t, 2 * k + 1].astype("float32") * w[1]


def quantized_linear(x: Any, parts: list[Any], spec: QuantSpec, shape: tuple[int, int], name: str,
                     nibble_pairs: bool = False) -> Any:
    """``x @ dequant(w).T`` for ``x [tokens, in]`` (an ``nn.Tensor``); returns ``[tokens, out]``.

    ``nibble_pairs`` (4-bit, CPU builds): reduce over the bytes of the codes, two products per
    byte (low and high nibble) in one expression, instead of dequantizing a ``[out, in]`` stage
    element by element: vectorized over bytes, every lane decodes its byte with the same shift
    and mask (the element-wise form gives each lane its own shift and scalarizes on llvm).
    """
    from tvm import te
    from tvm.relax.frontend import nn

    out_features, in_features = shape
    out_dtype = x.dtype
    pairs = nibble_pairs and spec.bits == 4 and in_features % 2 == 0 and spec.group_size % 2 == 0

    def compute(x_te: Any, *w_te: Any) -> Any:
        qdata, scales = w_te[0], w_te[1]
        offsets = w_te[2] if len(w_te) > 2 else None
        if pairs:
            k = te.reduce_axis((0, in_features // 2), name="k")
            acc = te.compute(
                (x_te.shape[0], out_features),
                lambda t, o: te.sum(_nibble_pair_term(x_te, qdata, scales, offsets, spec, t, o, k), axis=k),
                name="matmul",
            )
        else:
            weight = te.compute(
                (out_features, in_features),
                lambda o, i: dequant_expr(qdata, scales, offsets, spec, o, i),
                name="dequantize",
            )
            k = te.reduce_axis((0, in_features), name="k")
            acc = te.compute(
                (x_te.shape[0], out_features),
                lambda t, o: te.sum(x_te[t, k].astype("float32") * weight[o, k], axis=k),
                name="matmul",
            )
        if out_dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda t, o: acc[t, o].astype(out_dtype), name="cast")

    return nn.op.tensor_expr_op(compute, f"dequantize_matmul_{name}", [x, *parts])


def float_linear(x: Any, weight: Any, name: str) -> Any:
    """``x @ w.T`` reading ``w [out, in]`` as stored (no transposed copy), accumulated in float32."""
    from tvm import te
    from tvm.relax.frontend import nn

    out_dtype = x.dtype

    def compute(x_te: Any, w_te: Any) -> Any:
        k = te.reduce_axis((0, w_te.shape[1]), name="k")
        return te.compute(
            (x_te.shape[0], w_te.shape[0]),
            lambda t, o: te.sum((x_te[t, k].astype("float32") * w_te[o, k].astype("float32")), axis=k)
            .astype(out_dtype),
            name="matmul",
        )

    return nn.op.tensor_expr_op(compute, f"matmul_{name}", [x, weight])


def quantized_embedding(ids: Any, parts: list[Any], spec: QuantSpec, shape: tuple[int, int], dtype: str) -> Any:
    """Rows ``ids`` of a quantized table ``[vocab, hidden]``, dequantized to ``dtype``."""
    from tvm import te
    from tvm.relax.frontend import nn

    hidden = shape[1]

    def compute(ids_te: Any, *w_te: Any) -> Any:
        qdata, scales = w_te[0], w_te[1]
        offsets = w_te[2] if len(w_te) > 2 else None
        return te.compute(
            (ids_te.shape[0], hidden),
            lambda t, h: dequant_expr(qdata, scales, offsets, spec, ids_te[t], h).astype(dtype),
            name="dequantize_rows",
        )

    return nn.op.tensor_expr_op(compute, "dequantize_embedding", [ids, *parts])
