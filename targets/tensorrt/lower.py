"""Lower an llmc IR function to a TensorRT-ready ONNX graph: standard ONNX ops only.

This reuses the ONNX target's :class:`~llmc.targets.onnx.lower.Lowering` (graph builder,
external data, RoPE with standard ops, RMSNormalization, embeddings, splits) through its
extension points: :data:`TRT_OPS` is the ONNX op table with the handlers below replacing what
TensorRT's ONNX parser cannot take, and :class:`TrtLowering` overrides the hooks
``graph_input`` (``[batch, sequence]`` inputs) and ``float_param`` (dequantized weights):

* ``GroupQueryAttention`` -> ``Concat`` of the past and new KV, ``MatMul`` / ``Softmax`` with
  an additive mask built once from ``past_lengths`` (past entries beyond a row's length and
  future tokens of the same step are masked), or (target option ``attention=onnx``) the
  opset-23 ``Attention`` op with that mask; RoPE is always applied with standard ops;
* ``SkipSimplifiedLayerNormalization`` -> ``Add`` + ``RMSNormalization`` (opset 23);
* ``MatMulNBits`` -> ``DequantizeLinear`` (blocked INT4, INT8, see :mod:`.quant`) + ``MatMul``.

Graph interface (a padded batch: ``batch`` rows of ``sequence`` new tokens each)::

    input_ids     int64 [batch, sequence]   (padding: any id)
    positions     int64 [batch, sequence]   (padding: any position < max_position)
    past_lengths  int64 [batch]             valid entries in each row's past KV
    logits_index  int64 [outputs]           flattened rows (b * sequence + i) whose logits return
    past_key_values.{l}.key|value  float32 [batch, kv_heads, past_sequence, head_dim]
    -> logits float32 [outputs, vocab]
    -> present.{l}.key|value float32 [batch, kv_heads, past_sequence + sequence, head_dim]

Row ``b``'s query ``i`` sees past entries ``j < past_lengths[b]`` and new entries ``<= i``;
its new KV is ``present[b, :, past_sequence + i]``. Padded queries (``i >= `` the row's real
length) only see real entries and padding after them, so they never disturb real rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Module, Node
from llmc.compiler.ir.rope import RopeSpec
from llmc.compiler.weights import QuantizedTensor, WeightStore
from llmc.targets.lowering import LoweringTable, Refusal
from llmc.targets.onnx.graph import GraphBuilder
from llmc.targets.onnx.lower import ONNX_OPS, Handler, Lowering, past_name, present_name
from llmc.targets.tensorrt.quant import DqWeight

TENSORRT_OPS = frozenset({
    "Add", "And", "Attention", "Cast", "Concat", "DequantizeLinear", "Gather", "Gemm", "Identity", "Less",
    "LessOrEqual", "MatMul", "Mul", "Not", "Or", "RMSNormalization", "Range", "Reshape", "Shape", "Sigmoid",
    "Slice", "Softmax", "Split", "Squeeze", "Sub", "Tile", "Transpose", "Unsqueeze", "Where",
})
"""The ops this lowering may emit, each listed as supported (for the types used here) in the
operator matrix of TensorRT 10.15's ONNX parser (onnx-tensorrt ``docs/operators.md``)."""

ATTENTION_MODES = ("matmul", "onnx")
"""``matmul``: MatMul/Softmax/MatMul; ``onnx``: the opset-23 ``Attention`` op on the concatenated
KV with the same additive mask (TensorRT 10.15 parses it without past/present, as used here)."""

MASKED = -1e30
"""Additive bias of a masked score (finite: no inf arithmetic; every row keeps one real key)."""


class TrtLowering(Lowering):
    """:class:`Lowering` with standard-op attention, norms and blocked-DQ quantized matmuls (:data:`TRT_OPS`)."""

    def __init__(self, module: Module, weights: WeightStore, g: GraphBuilder, attention: str = "matmul") -> None:
        if attention not in ATTENTION_MODES:
            raise UnsupportedError(f"tensorrt attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        super().__init__(module, weights, g, accuracy_level=0)
        self.attention = attention
        self.dq: dict[int, DqWeight] = {}
        self._bias: dict[int, str] = {}
        self._dims: tuple[str, str] | None = None
        self._past_len: str | None = None

    # -- hooks ---------------------------------------------------------------------------
    def graph_input(self, name: str, dtype: str) -> str:
        """``input_ids`` / ``positions`` come in as ``[batch, sequence]`` and are flattened."""
        if name not in self.inputs:
            if name in ("input_ids", "positions"):
                declared = self.g.add_input(name, np.int64, ["batch", "sequence"])
                self.inputs[name] = self.g.one("Reshape", [declared, self.g.const([-1])], hint=f"{name}_flat")
                if name == "input_ids":
                    self.inputs["input_ids_2d"] = declared
            elif name == "logits_index":
                self.inputs[name] = self.g.add_input(name, np.int64, ["outputs"])
            else:
                raise UnsupportedError(f"the tensorrt target does not know function input {name!r}")
        return self.inputs[name]

    def float_param(self, name: str, dtype: Any = None) -> str:
        if isinstance(self.weights[name], QuantizedTensor):  # [out, in] like every float param
            return self.g.one("Transpose", [self.dq_weight(name).value()], perm=[1, 0])
        return super().float_param(name, dtype)

    # -- helpers -------------------------------------------------------------------------
    def batch_dims(self) -> tuple[str, str]:
        """``[batch, sequence]`` as an int64 shape tensor, and ``sequence`` alone ``[1]``."""
        if self._dims is None:
            self.graph_input("input_ids", "int64")
            bs = self.g.one("Shape", [self.inputs["input_ids_2d"]], hint="batch_seq")
            seq = self.g.one("Slice", [bs, self.g.const([1]), self.g.const([2]), self.g.const([0])], hint="seq")
            self._dims = (bs, seq)
        return self._dims

    def past_lengths(self) -> str:
        if self._past_len is None:
            self._past_len = self.g.add_input("past_lengths", np.int64, ["batch"])
        return self._past_len

    def dq_weight(self, name: str) -> DqWeight:
        weight = self.weights[name]
        assert isinstance(weight, QuantizedTensor)
        if id(weight) not in self.dq:
            self.dq[id(weight)] = DqWeight(self.g, name, weight)
        self.param_records.setdefault(name, self.dq[id(weight)].record())
        return self.dq[id(weight)]

    def mask_bias(self, group: int, past_key: str) -> str:
        """Additive mask ``[batch, 1, group * sequence, past + sequence]`` (0 or MASKED)."""
        if group in self._bias:
            return self._bias[group]
        g = self.g
        if 1 not in self._bias:
            _, seq = self.batch_dims()
            past = g.one("Slice", [g.one("Shape", [past_key]), g.const([2]), g.const([3]), g.const([0])],
                         hint="past_seq")
            total = g.one("Add", [past, seq], hint="total_seq")
            zero, one = g.const(0), g.const(1)
            keys = g.one("Range", [zero, g.one("Squeeze", [total, g.const([0])]), one], hint="key_index")
            queries = g.one("Range", [zero, g.one("Squeeze", [seq, g.const([0])]), one], hint="query_index")
            from_past = g.one("Less", [keys, past])  # [T]
            lengths = g.one("Unsqueeze", [self.past_lengths(), g.const([1, 2])])  # [B, 1, 1]
            past_ok = g.one("And", [from_past, g.one("Less", [keys, lengths])])  # [B, 1, T]
            new_index = g.one("Sub", [keys, past])  # [T]
            causal = g.one("LessOrEqual", [new_index, g.one("Unsqueeze", [queries, g.const([1])])])  # [S, T]
            new_ok = g.one("And", [g.one("Not", [from_past]), causal])
            valid = g.one("Or", [past_ok, new_ok])  # [B, S, T]
            bias = g.one("Where", [valid, g.const(0.0, np.float32), g.const(MASKED, np.float32)])
            self._bias[1] = g.one("Unsqueeze", [bias, g.const([1])], hint="mask_bias")  # [B, 1, S, T]
        if group != 1:  # query rows are (group member, token): repeat the mask per member
            self._bias[group] = g.one("Tile", [self._bias[1], g.const([1, 1, group, 1])], hint="mask_bias")
        return self._bias[group]

    def heads_first(self, x: str, heads: int, dim: int) -> str:
        """``[tokens, heads, dim]`` -> ``[batch, heads, sequence, dim]``."""
        g = self.g
        bs, _ = self.batch_dims()
        shape = g.one("Concat", [bs, g.const([heads, dim])], axis=0)
        return g.one("Transpose", [g.one("Reshape", [self.flat_of(x), shape])], perm=[0, 2, 1, 3])


def _trt(lw: Lowering) -> TrtLowering:
    assert isinstance(lw, TrtLowering)
    return lw


# -- handlers ------------------------------------------------------------------------------
def _embedding(lw: Lowering, node: Node) -> list[str]:
    name = lw.param_of(node.inputs[0])
    if name is not None and lw.is_quantized(name):
        table = _trt(lw).dq_weight(name).value()  # [hidden, vocab]
        columns = lw.g.one("Gather", [table, lw.value(node.inputs[1])], axis=1)
        return [lw.g.one("Transpose", [columns], perm=[1, 0])]
    return ONNX_OPS.handler("embedding")(lw, node)


def _add_rms_norm(lw: Lowering, node: Node) -> list[str]:
    x, residual, w = node.inputs
    total = lw.g.one("Add", [lw.value(x), lw.value(residual)], hint="residual")
    out = lw.g.one("RMSNormalization", [total, lw.norm_weight(w)], axis=-1,
                   epsilon=float(node.attrs["eps"]), stash_type=1)  # type: ignore[arg-type]
    return [out, total]


def _linear(lw: Lowering, node: Node) -> list[str]:
    x, w = node.inputs
    name = lw.param_of(w)
    if name is not None and lw.is_quantized(name):
        lw.stats.dequant_linear += 1
        return [lw.g.one("MatMul", [lw.value(x), _trt(lw).dq_weight(name).value()])]
    return ONNX_OPS.handler("linear")(lw, node)


def _attention(lw: Lowering, node: Node) -> list[str]:
    trt = _trt(lw)
    q, k, v = node.inputs[:3]
    attrs = node.attrs
    hq, hd = int(q.type.shape[1]), int(q.type.shape[2])
    hkv = int(k.type.shape[1])
    group = hq // hkv
    layer = int(attrs["layer"])  # type: ignore[call-overload]
    trt.register_layer(layer)
    qs, ks, vs = trt.value(q), trt.value(k), trt.value(v)
    if node.op == "rope_attention":
        pos = trt.value(node.inputs[3])
        spec = RopeSpec.from_attrs(attrs)
        qs, ks = trt.apply_rope(qs, pos, spec, hd), trt.apply_rope(ks, pos, spec, hd)
    g = trt.g
    past_k, past_v = past_name(layer, "key"), past_name(layer, "value")
    for name in (past_k, past_v):
        g.add_input(name, np.float32, ["batch", hkv, "past_sequence", hd])
    key = g.node("Concat", [past_k, trt.heads_first(ks, hkv, hd)], outputs=[present_name(layer, "key")],
                 axis=2)[0]
    value = g.node("Concat", [past_v, trt.heads_first(vs, hkv, hd)], outputs=[present_name(layer, "value")],
                   axis=2)[0]
    if trt.attention == "onnx":  # [B, hq, S, D] against [B, hkv, T, D]: GQA from the head counts
        out = g.one("Attention", [trt.heads_first(qs, hq, hd), key, value, trt.mask_bias(1, past_k)],
                    scale=float(attrs["scale"]))  # type: ignore[arg-type]
        out = g.one("Transpose", [out], perm=[0, 2, 1, 3])
        return [g.one("Reshape", [out, g.const([-1, hq, hd])], hint=f"attn{layer}")]
    query = g.one("Reshape", [trt.heads_first(qs, hq, hd), g.const([0, hkv, -1, hd])])  # [B, hkv, g*S, D]
    scores = g.one("MatMul", [query, g.one("Transpose", [key], perm=[0, 1, 3, 2])])
    scores = g.one("Mul", [scores, g.const(float(attrs["scale"]), np.float32)])  # type: ignore[arg-type]
    probs = g.one("Softmax", [g.one("Add", [scores, trt.mask_bias(group, past_k)])], axis=-1)
    out = g.one("MatMul", [probs, value])  # [B, hkv, g*S, D]
    out = g.one("Transpose", [g.one("Reshape", [out, g.const([0, hq, -1, hd])])], perm=[0, 2, 1, 3])
    return [g.one("Reshape", [out, g.const([-1, hq, hd])], hint=f"attn{layer}")]


TRT_OPS: LoweringTable[Handler] = ONNX_OPS.extend("tensorrt", {
    "embedding": _embedding, "add_rms_norm": _add_rms_norm, "linear": _linear,
    "attention": _attention, "rope_attention": _attention,
    "packed_rope_attention": Refusal("TensorRT's attention reads q, k and v separately (standard ops); the "
                                     "pack-qkv-attention rewrite is for ONNX Runtime's GroupQueryAttention"),
})
"""The tensorrt target's lowering: the ONNX table with standard-op handlers where TensorRT needs them."""

TrtLowering.table = TRT_OPS
