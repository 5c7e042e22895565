"""Lower an llmc IR function to one ONNX graph that serves prefill and decode.

The graph keeps the IR's flattened-token form (``[tokens, hidden]`` everywhere) and views the
tokens as ``[batch, tokens / batch]`` only around attention, where ``GroupQueryAttention`` reads
the past KV of each row and writes the new entries at its own length (``seqlens_k``), so one
call serves a ragged decode batch, a prefill, or a prefill chunk after a cached prefix.

Graph interface (what the executor feeds):

* ``input_ids`` int64 ``[tokens]``; ``positions`` int64 ``[tokens]`` (only when RoPE is applied
  outside GQA); ``logits_index`` int64 ``[outputs]``: rows whose logits are returned;
* ``seqlens_k`` int32 ``[batch]``: context length - 1 of each row; ``total_sequence_length``
  int32 scalar: the longest context;
* ``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head_dim]`` -> outputs
  ``present.{i}.key|value`` (bind both to one buffer and GQA appends in place);
* output ``logits`` float32 ``[outputs, vocab]``.

Lowering (the op table :data:`ONNX_OPS`): ``linear`` -> ``MatMulNBits`` (quantized) or
``Gemm(transB=1)`` (float, so a tied head reads the embedding table itself);
``attention``/``rope_attention`` -> ``GroupQueryAttention`` (with ``do_rotary`` when its kernel
accepts the head size, else RoPE with standard ops first); ``packed_rope_attention`` (the
target's ``pack-qkv-attention`` rewrite) -> ``GroupQueryAttention`` reading the fused qkv
projection as its packed query; ``add_rms_norm`` -> ``SkipSimplifiedLayerNormalization``;
``rms_norm`` -> ``RMSNormalization``; the rest -> standard ops.

A target that reuses this lowering (TensorRT) subclasses :class:`Lowering`, sets its class
attribute ``table`` to a table derived with ``ONNX_OPS.extend(...)``, and may override the two
hooks :meth:`Lowering.graph_input` and :meth:`Lowering.float_param`; its handlers use the
public helpers of :class:`Lowering`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.rope import RopeSpec
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, WeightStore
from llmc.targets.lowering import LoweringTable
from llmc.targets.onnx.graph import MS_DOMAIN, GraphBuilder
from llmc.targets.onnx.quant import QuantTensors
from llmc.targets.onnx.target import GQA_ROTARY_HEAD_MULTIPLE, GQA_ROTARY_PAIRS_MULTIPLE

FUNCTION = "prefill"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass
class ParamRef:
    """A ``param`` node's value: materialized on demand in the layout its user wants."""

    name: str


@dataclass
class InputRef:
    """A function input: declared as a graph input on first use."""

    name: str
    dtype: str


@dataclass
class LoweringStats:
    """What the lowering produced (recorded in the manifest)."""

    gqa_rotary: int = 0
    explicit_rope: int = 0
    packed_qkv: int = 0
    matmulnbits: int = 0
    dequant_linear: int = 0
    float_linear: int = 0
    layers: list[int] = field(default_factory=list)


Handler = Callable[["Lowering", Node], list[str]]
"""Lowers one node: ``(lowering, node) -> the ONNX names of its results``."""


def gqa_rotary_ok(spec: RopeSpec, head_dim: int) -> bool:
    """Whether GroupQueryAttention's own rotary kernel accepts these sizes (head % 16, rot/2 % 8)."""
    return head_dim % GQA_ROTARY_HEAD_MULTIPLE == 0 and (spec.rotary_dim // 2) % GQA_ROTARY_PAIRS_MULTIPLE == 0


class Lowering:
    """Builds the ONNX graph of one IR function, dispatching each node through :attr:`table`."""

    table: ClassVar[LoweringTable[Handler]]
    """op -> handler; set below to :data:`ONNX_OPS` (a subclass sets its own, derived from it)."""

    def __init__(self, module: Module, weights: WeightStore, g: GraphBuilder, accuracy_level: int = 0) -> None:
        if FUNCTION not in module.functions:
            raise UnsupportedError(f"the onnx target lowers the {FUNCTION!r} function; the module has "
                                   f"{sorted(module.functions)}")
        self.module = module
        self.fn: Function = module.functions[FUNCTION]
        self.weights = weights
        self.g = g
        self.config = ModelConfig.from_dict(module.config)
        self.accuracy_level = accuracy_level
        self.env: dict[tuple[int, int], str | ParamRef | InputRef] = {}
        self.inputs: dict[str, str] = {}
        self.float_inits: dict[int, str] = {}
        self.quant_inits: dict[int, QuantTensors] = {}
        self.param_records: dict[str, dict[str, Any]] = {}
        self.stats = LoweringStats()
        self._rope_tables: dict[RopeSpec, tuple[str, str]] = {}
        self._rope_rows: dict[tuple[RopeSpec, str], tuple[str, str]] = {}
        self._shapes: dict[int, str] = {}
        self._flat: dict[str, str] = {}  # a [tokens, heads, dim] value -> the same data as [..., heads*dim]

    # -- driver --------------------------------------------------------------------------
    def run(self) -> None:
        """Lower every node and declare the graph outputs."""
        self.table.check_module(Module({FUNCTION: self.fn}, self.module.params, self.module.config))
        act = self._activation_dtype()
        if act != "float32":
            raise UnsupportedError(f"the onnx target runs float32 activations; this module uses {act}")
        for node in self.fn.nodes:
            if node.op == "input":
                name = str(node.attrs["name"])
                if name != "kv_cache":
                    self.env[(id(node), 0)] = InputRef(name, node.out_types[0].dtype)
            elif node.op == "param":
                self.env[(id(node), 0)] = ParamRef(str(node.attrs["name"]))
            else:
                for i, out in enumerate(self.table.handler(node.op)(self, node)):
                    self.env[(id(node), i)] = out
        if sorted(self.stats.layers) != list(range(self.config.num_layers)):
            raise UnsupportedError(f"attention layers {sorted(self.stats.layers)} do not cover the "
                                   f"{self.config.num_layers} layers of the config")
        logits = self.value(self.fn.outputs["logits"])
        self.g.node("Identity", [logits], outputs=["logits"])
        self.g.add_output("logits", np.float32, ["outputs", self.config.vocab_size])
        for layer in range(self.config.num_layers):
            for kind in ("key", "value"):
                self.g.add_output(present_name(layer, kind), np.float32,
                                  ["batch", self.config.num_kv_heads, "total_sequence_length", self.config.head_dim])

    def _activation_dtype(self) -> str:
        for node in self.fn.nodes:
            if node.op == "embedding":
                return str(node.attrs["dtype"])
        return "float32"

    # -- values (hooks: graph_input, float_param) ----------------------------------------
    def value(self, v: Value) -> str:
        """The ONNX name of an IR value (params materialize as float32 initializers)."""
        ref = self.env[(id(v.node), v.index)]
        if isinstance(ref, ParamRef):
            return self.float_param(ref.name, np.float32)
        if isinstance(ref, InputRef):
            return self.graph_input(ref.name, ref.dtype)
        return ref

    def graph_input(self, name: str, dtype: str) -> str:
        """Hook: the graph value of function input ``name``, declared on first use."""
        if name not in self.inputs:
            dims = {"input_ids": ["tokens"], "positions": ["tokens"], "logits_index": ["outputs"]}
            if name not in dims:
                raise UnsupportedError(f"the onnx target does not know function input {name!r}")
            self.inputs[name] = self.g.add_input(name, NUMPY_DTYPES[dtype], dims[name])
        return self.inputs[name]

    def param_of(self, v: Value) -> str | None:
        """The param name when ``v`` reads a param, else None."""
        ref = self.env[(id(v.node), v.index)]
        return ref.name if isinstance(ref, ParamRef) else None

    def float_param(self, name: str, dtype: Any = None) -> str:
        """Hook: a param as a float ``[out, in]`` value; here an initializer in its stored dtype
        (cast to ``dtype`` in the graph; quantized weights dequantized with standard ops)."""
        weight = self.weights[name]
        if isinstance(weight, QuantizedTensor):
            quant = self.quant_param(name)
            return quant.rows(self.g.const(np.arange(quant.qt.shape[0]), np.int64))
        array = np.asarray(weight)
        if array.ndim == 1 and array.dtype != np.float32:
            array = array.astype(np.float32)  # norm vectors: exact
        if id(weight) not in self.float_inits:
            self.float_inits[id(weight)] = self.g.weight(name, array)
        init = self.float_inits[id(weight)]
        self.param_records.setdefault(name, {"kind": "float", "init": init})
        if dtype is not None and array.dtype != np.dtype(dtype):
            return self.g.one("Cast", [init], to=1, hint=f"{name}.f32")
        return init

    def quant_param(self, name: str) -> QuantTensors:
        weight = self.weights[name]
        assert isinstance(weight, QuantizedTensor)
        if id(weight) not in self.quant_inits:
            self.quant_inits[id(weight)] = QuantTensors(self.g, name, weight)
        tensors = self.quant_inits[id(weight)]
        self.param_records.setdefault(name, tensors.record())
        return tensors

    def is_quantized(self, name: str | None) -> bool:
        return name is not None and isinstance(self.weights[name], QuantizedTensor)

    def norm_weight(self, v: Value) -> str:
        """A norm vector as float32."""
        name = self.param_of(v)
        return self.float_param(name, np.float32) if name is not None else self.value(v)

    def flat_of(self, x: str) -> str:
        """The ``[tokens, heads * dim]`` value a ``[tokens, heads, dim]`` value was reshaped from (else ``x``)."""
        return self._flat.get(x, x)

    def mark_heads_view(self, heads: str, flat: str) -> None:
        """Record that ``heads [tokens, h, d]`` is a reshape of ``flat [tokens, h * d]`` (see :meth:`flat_of`)."""
        self._flat[heads] = flat

    def silu_of(self, x: str) -> str:
        return self.g.one("Mul", [x, self.g.one("Sigmoid", [x])], hint="silu")

    def register_layer(self, layer: int) -> None:
        """Record that an attention op writes kv ``layer`` (refusing a second one)."""
        if layer in self.stats.layers:
            raise UnsupportedError(f"two attention ops write kv layer {layer}")
        self.stats.layers.append(layer)

    # -- rope ----------------------------------------------------------------------------
    def rope_table(self, spec: RopeSpec) -> tuple[str, str]:
        """cos/sin ``[max_position, rotary_dim / 2]`` float32 for these rope settings."""
        if spec not in self._rope_tables:
            cos, sin = spec.cos_sin(np.arange(self.config.max_position))
            self._rope_tables[spec] = (self.g.weight("rope.cos", cos.astype(np.float32)),
                                       self.g.weight("rope.sin", sin.astype(np.float32)))
        return self._rope_tables[spec]

    def apply_rope(self, x: str, pos: str, spec: RopeSpec, head_dim: int) -> str:
        """RoPE with standard ops on ``x [tokens, heads, head_dim]`` (same arithmetic as the torch target)."""
        g = self.g
        rot = spec.rotary_dim
        half = rot // 2
        interleaved = not spec.half
        key = (spec, pos)
        if key not in self._rope_rows:
            cos_table, sin_table = self.rope_table(spec)
            axes = g.const([1, 3] if interleaved else [1])
            self._rope_rows[key] = (
                g.one("Unsqueeze", [g.one("Gather", [cos_table, pos], axis=0), axes], hint="rope_cos"),
                g.one("Unsqueeze", [g.one("Gather", [sin_table, pos], axis=0), axes], hint="rope_sin"),
            )
        cos, sin = self._rope_rows[key]
        rotated = x if rot == head_dim else g.one("Slice", [x, g.const([0]), g.const([rot]), g.const([2])])
        if interleaved:
            pairs = g.one("Reshape", [rotated, g.const([0, 0, half, 2])])
            a, b = g.node("Split", [pairs, g.const([1, 1])], 2, axis=3)
        else:
            a, b = g.node("Split", [rotated, g.const([half, half])], 2, axis=2)
        ra = g.one("Sub", [g.one("Mul", [a, cos]), g.one("Mul", [b, sin])])
        rb = g.one("Add", [g.one("Mul", [b, cos]), g.one("Mul", [a, sin])])
        out = g.one("Concat", [ra, rb], axis=3 if interleaved else 2)
        if interleaved:
            out = g.one("Reshape", [out, g.const([0, 0, rot])])
        if rot != head_dim:
            rest = g.one("Slice", [x, g.const([rot]), g.const([head_dim]), g.const([2])])
            out = g.one("Concat", [out, rest], axis=2)
        self.stats.explicit_rope += 1
        return out

    # -- GroupQueryAttention -------------------------------------------------------------
    def _batch_shape(self, width: int) -> str:
        """``[batch, -1, width]`` with batch read from ``seqlens_k``."""
        if width not in self._shapes:
            batch = self.g.one("Shape", [self._seqlens()], hint="batch")
            self._shapes[width] = self.g.one("Concat", [batch, self.g.const([-1, width])], axis=0, hint="bsh")
        return self._shapes[width]

    def _seqlens(self) -> str:
        if "seqlens_k" not in self.inputs:
            self.inputs["seqlens_k"] = self.g.add_input("seqlens_k", np.int32, ["batch"])
            self.inputs["total_sequence_length"] = self.g.add_input("total_sequence_length", np.int32, [])
        return self.inputs["seqlens_k"]

    def group_query_attention(self, node: Node, heads: int, kv_heads: int, head_dim: int, qkv: list[str],
                              rotary: tuple[str, str] | None) -> list[str]:
        """``GroupQueryAttention`` of kv layer ``node.attrs['layer']`` over q, k, v (``qkv``: three
        ``[tokens, heads, dim]`` values, or one packed ``[tokens, (hq + 2 hkv) * dim]``); ``rotary``:
        the cos/sin tables when GQA applies RoPE itself."""
        attrs, g = node.attrs, self.g
        hq, hkv, hd = heads, kv_heads, head_dim
        layer = int(attrs["layer"])  # type: ignore[call-overload]
        seqlens = self._seqlens()
        for kind in ("key", "value"):
            g.add_input(past_name(layer, kind), np.float32, ["batch", hkv, "past_sequence_length", hd])
        if len(qkv) == 1:  # query = [batch, seq, (hq + 2 hkv) * hd]; key, value absent
            self.stats.packed_qkv += 1
            query = [g.one("Reshape", [qkv[0], self._batch_shape((hq + 2 * hkv) * hd)]), "", ""]
        else:
            qs, ks, vs = qkv
            query = [g.one("Reshape", [self.flat_of(qs), self._batch_shape(hq * hd)]),
                     g.one("Reshape", [self.flat_of(ks), self._batch_shape(hkv * hd)]),
                     g.one("Reshape", [self.flat_of(vs), self._batch_shape(hkv * hd)])]
        inputs = [*query, past_name(layer, "key"), past_name(layer, "value"), seqlens,
                  self.inputs["total_sequence_length"]]
        if rotary is not None:
            inputs += list(rotary)
        out = g.fresh(f"attn{layer}")
        g.node("GroupQueryAttention", inputs, outputs=[out, present_name(layer, "key"), present_name(layer, "value")],
               domain=MS_DOMAIN, num_heads=hq, kv_num_heads=hkv, scale=float(attrs["scale"]),  # type: ignore[arg-type]
               do_rotary=int(rotary is not None),
               rotary_interleaved=int(rotary is not None and attrs["style"] == "interleaved"))
        out_heads = g.one("Reshape", [out, g.const([-1, hq, hd])])
        self.mark_heads_view(out_heads, out)  # merge_heads reshapes GQA's [batch, seq, hq*hd] output directly
        return [out_heads]


def _check_gqa_head(head_dim: int) -> None:
    if head_dim % 8:
        raise UnsupportedError(f"GroupQueryAttention needs a head size that is a multiple of 8, got {head_dim}")


# -- handlers ------------------------------------------------------------------------------
def _embedding(lw: Lowering, node: Node) -> list[str]:
    table, ids = node.inputs
    name = lw.param_of(table)
    ids_name = lw.value(ids)
    if name is not None and lw.is_quantized(name):
        return [lw.quant_param(name).rows(ids_name)]
    table_name = lw.float_param(name) if name is not None else lw.value(table)
    rows = lw.g.one("Gather", [table_name, ids_name], axis=0)
    if name is not None and np.asarray(lw.weights[name]).dtype != np.float32:
        rows = lw.g.one("Cast", [rows], to=1)
    return [rows]


def _rms_norm(lw: Lowering, node: Node) -> list[str]:
    x, w = node.inputs
    return [lw.g.one("RMSNormalization", [lw.value(x), lw.norm_weight(w)], axis=-1,
                     epsilon=float(node.attrs["eps"]), stash_type=1)]  # type: ignore[arg-type]


def _add_rms_norm(lw: Lowering, node: Node) -> list[str]:
    x, residual, w = node.inputs
    out, total = lw.g.fresh("normed"), lw.g.fresh("residual")
    lw.g.node("SkipSimplifiedLayerNormalization", [lw.value(x), lw.value(residual), lw.norm_weight(w)],
              outputs=[out, "", "", total], domain=MS_DOMAIN, epsilon=float(node.attrs["eps"]))  # type: ignore[arg-type]
    return [out, total]


def _linear(lw: Lowering, node: Node) -> list[str]:
    x, w = node.inputs
    name = lw.param_of(w)
    xs = lw.value(x)
    if name is not None and lw.is_quantized(name):
        quant = lw.quant_param(name)
        if quant.uses_matmulnbits(lw.accuracy_level):
            lw.stats.matmulnbits += 1
        else:
            lw.stats.dequant_linear += 1
        return [quant.linear(xs, lw.accuracy_level)]
    lw.stats.float_linear += 1
    weight = lw.float_param(name, np.float32) if name is not None else lw.value(w)
    return [lw.g.one("Gemm", [xs, weight], transB=1)]


def _split(lw: Lowering, node: Node) -> list[str]:
    sizes = [int(s) for s in node.attrs["sizes"]]  # type: ignore[union-attr]
    return lw.g.node("Split", [lw.value(node.inputs[0]), lw.g.const(sizes)], len(sizes), axis=-1)


def _split_heads(lw: Lowering, node: Node) -> list[str]:
    heads, dim = int(node.attrs["heads"]), int(node.attrs["head_dim"])  # type: ignore[call-overload]
    flat = lw.value(node.inputs[0])
    out = lw.g.one("Reshape", [flat, lw.g.const([-1, heads, dim])])
    lw.mark_heads_view(out, flat)
    return [out]


def _merge_heads(lw: Lowering, node: Node) -> list[str]:
    t = node.inputs[0].type
    width = int(t.shape[1]) * int(t.shape[2])
    x = lw.value(node.inputs[0])
    return [lw.g.one("Reshape", [lw.flat_of(x), lw.g.const([-1, width])])]


def _binary(op: str) -> Handler:
    return lambda lw, node: [lw.g.one(op, [lw.value(v) for v in node.inputs])]


def _gather_rows(lw: Lowering, node: Node) -> list[str]:
    x, idx = node.inputs
    return [lw.g.one("Gather", [lw.value(x), lw.value(idx)], axis=0)]


def _swiglu(lw: Lowering, node: Node) -> list[str]:
    width = int(node.inputs[0].type.shape[1])
    gate, up = lw.g.node("Split", [lw.value(node.inputs[0]), lw.g.const([width // 2, width // 2])], 2, axis=-1)
    return [lw.g.one("Mul", [lw.silu_of(gate), up], hint="swiglu")]


def _rope(lw: Lowering, node: Node) -> list[str]:
    x, pos = node.inputs
    return [lw.apply_rope(lw.value(x), lw.value(pos), RopeSpec.from_attrs(node.attrs), int(x.type.shape[2]))]


def _attention(lw: Lowering, node: Node) -> list[str]:
    q, k, v = node.inputs[:3]
    hq, hd, hkv = int(q.type.shape[1]), int(q.type.shape[2]), int(k.type.shape[1])
    _check_gqa_head(hd)
    lw.register_layer(int(node.attrs["layer"]))  # type: ignore[call-overload]
    qs, ks, vs = lw.value(q), lw.value(k), lw.value(v)
    rotary: tuple[str, str] | None = None
    if node.op == "rope_attention":
        spec = RopeSpec.from_attrs(node.attrs)
        if gqa_rotary_ok(spec, hd):
            rotary = lw.rope_table(spec)
            lw.stats.gqa_rotary += 1
        else:
            pos = lw.value(node.inputs[3])
            qs, ks = lw.apply_rope(qs, pos, spec, hd), lw.apply_rope(ks, pos, spec, hd)
    return lw.group_query_attention(node, hq, hkv, hd, [qs, ks, vs], rotary)


def _packed_rope_attention(lw: Lowering, node: Node) -> list[str]:
    a = node.attrs
    hq, hkv, hd = int(a["heads"]), int(a["kv_heads"]), int(a["head_dim"])  # type: ignore[call-overload]
    _check_gqa_head(hd)
    lw.register_layer(int(a["layer"]))  # type: ignore[call-overload]
    qkv = lw.value(node.inputs[0])
    spec = RopeSpec.from_attrs(a)
    if not gqa_rotary_ok(spec, hd):
        raise UnsupportedError(f"layer {a['layer']}: GroupQueryAttention applies RoPE to a packed qkv only for "
                               f"head_dim % {GQA_ROTARY_HEAD_MULTIPLE} == 0 and rotary_dim / 2 % "
                               f"{GQA_ROTARY_PAIRS_MULTIPLE} == 0 (head_dim {hd}, rotary_dim {spec.rotary_dim}); "
                               "run pack-qkv-attention with the onnx target's sizes")
    rotary = lw.rope_table(spec)
    lw.stats.gqa_rotary += 1
    return lw.group_query_attention(node, hq, hkv, hd, [qkv], rotary)


ONNX_OPS: LoweringTable[Handler] = LoweringTable("onnx", {
    "embedding": _embedding, "rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "linear": _linear,
    "split": _split, "split_heads": _split_heads, "merge_heads": _merge_heads, "rope": _rope,
    "attention": _attention, "rope_attention": _attention, "packed_rope_attention": _packed_rope_attention,
    "silu": lambda lw, node: [lw.silu_of(lw.value(node.inputs[0]))], "mul": _binary("Mul"), "add": _binary("Add"),
    "gather_rows": _gather_rows, "swiglu": _swiglu,
})
"""The onnx target's lowering: op -> handler ``(lowering, node) -> ONNX names``."""

Lowering.table = ONNX_OPS
