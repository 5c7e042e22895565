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


def dequant_expr(te_qdata: Any, te_scales: Any, te_offsets: Any, spec: QuantSpec, row: Any, col: Any) -> Any:
    """The float32 value of weight element ``[row, col]`` as a TIR expression."""
    from tvm import tirx

    if spec.bits == 8:
        code = te_qdata[row, col].astype("int32")
    else:
        byte = te_qdata[row, col // 2].astype("int32")
        code = tirx.bitwise_and(tirx.shift_right(byte, (col % 2 * 4).astype("int32")), tirx.const(15, "int32"))
    scale = te_scales[row, col // spec.group_size].astype("float32")
    if spec.symmetric:
        return scale * (code.astype("float32") - tirx.const(float(2 ** (spec.bits - 1)), "float32"))
    offset = te_offsets[row, col // spec.group_size].astype("float32")
    return scale * code.astype("float32") + offset


def quantized_linear(x: Any, parts: list[Any], spec: QuantSpec, shape: tuple[int, int], name: str) -> Any:
    """``x @ dequant(w).T`` for ``x [tokens, in]`` (an ``nn.Tensor``); returns ``[tokens, out]``."""
    from tvm import te
    from tvm.relax.frontend import nn

    out_features, in_features = shape
    out_dtype = x.dtype

    def compute(x_te: Any, *w_te: Any) -> Any:
        qdata, scales = w_te[0], w_te[1]
        offsets = w_te[2] if len(w_te) > 2 else None
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
