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

Lowering: ``linear`` -> ``MatMulNBits`` (quantized) or ``Gemm(transB=1)`` (float, so a tied
head reads the embedding table itself); ``attention``/``rope_attention`` ->
``GroupQueryAttention`` (with ``do_rotary`` when its kernel accepts the head size, else RoPE
with standard ops first); ``add_rms_norm`` -> ``SkipSimplifiedLayerNormalization``;
``rms_norm`` -> ``RMSNormalization``; the rest -> standard ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.rope import cos_sin
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, WeightStore
from llmc.targets.onnx.graph import MS_DOMAIN, GraphBuilder
from llmc.targets.onnx.quant import QuantTensors

ROPE_KEYS = ("theta", "style", "rotary_dim", "scaling", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position")
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


class Lowering:
    """Builds the ONNX graph of one IR function."""

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
        self._rope_tables: dict[tuple, tuple[str, str]] = {}
        self._rope_rows: dict[tuple, tuple[str, str]] = {}
        self._shapes: dict[int, str] = {}
        self._flat: dict[str, str] = {}  # a [tokens, heads, dim] value -> the same data as [..., heads*dim]
        self._packed, self._skip = self._find_packed_qkv()
        self._handlers: dict[str, Callable[[Node], list[str]]] = {
            "embedding": self._embedding, "rms_norm": self._rms_norm, "add_rms_norm": self._add_rms_norm,
            "linear": self._linear, "split": self._split, "split_heads": self._split_heads,
            "merge_heads": self._merge_heads, "rope": self._rope, "attention": self._attention,
            "rope_attention": self._attention, "silu": self._silu, "mul": self._binary("Mul"),
            "add": self._binary("Add"), "gather_rows": self._gather_rows, "swiglu": self._swiglu,
        }

    # -- driver --------------------------------------------------------------------------
    def run(self) -> None:
        """Lower every node and declare the graph outputs."""
        act = self._activation_dtype()
        if act != "float32":
            raise UnsupportedError(f"the onnx target runs float32 activations; this module uses {act}")
        for node in self.fn.nodes:
            if node in self._skip:
                continue
            if node.op == "input":
                name = str(node.attrs["name"])
                if name != "kv_cache":
                    self.env[(id(node), 0)] = InputRef(name, node.out_types[0].dtype)
            elif node.op == "param":
                self.env[(id(node), 0)] = ParamRef(str(node.attrs["name"]))
            else:
                handler = self._handlers.get(node.op)
                if handler is None:
                    raise UnsupportedError(f"the onnx target cannot lower op {node.op!r}")
                for i, out in enumerate(handler(node)):
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

    def _find_packed_qkv(self) -> tuple[dict[Node, Value], set[Node]]:
        """Attention ops whose q, k, v are the three heads-views of one ``split`` of one tensor.

        GQA then reads that ``[tokens, (hq + 2 hkv) * dim]`` tensor as its packed ``query`` (no
        split, no copies), when no RoPE has to be applied outside it. Returns attention node ->
        packed value, and the split/split_heads nodes that need no lowering.
        """
        users = self.fn.users()
        packed: dict[Node, Value] = {}
        skip: set[Node] = set()
        for node in self.fn.nodes:
            if node.op not in ("attention", "rope_attention"):
                continue
            q, k, v = node.inputs[:3]
            if node.op == "rope_attention" and not self.gqa_rotary_ok(node.attrs, int(q.type.shape[2])):
                continue
            views = [x.node for x in (q, k, v)]
            if any(n.op != "split_heads" or users[n] != [node] for n in views):
                continue
            sources = [n.inputs[0] for n in views]
            split = sources[0].node
            if (split.op != "split" or [x.node for x in sources] != [split] * 3
                    or [x.index for x in sources] != [0, 1, 2] or len(split.out_types) != 3
                    or len(users[split]) != 3):
                continue
            packed[node] = split.inputs[0]
            skip.update((split, *views))
        return packed, skip

    def _activation_dtype(self) -> str:
        for node in self.fn.nodes:
            if node.op == "embedding":
                return str(node.attrs["dtype"])
        return "float32"

    # -- values --------------------------------------------------------------------------
    def value(self, v: Value) -> str:
        """The ONNX name of an IR value (params materialize as float32 initializers)."""
        ref = self.env[(id(v.node), v.index)]
        if isinstance(ref, ParamRef):
            return self.float_param(ref.name, np.float32)
        if isinstance(ref, InputRef):
            return self.graph_input(ref.name, ref.dtype)
        return ref

    def graph_input(self, name: str, dtype: str) -> str:
        if name not in self.inputs:
            dims = {"input_ids": ["tokens"], "positions": ["tokens"], "logits_index": ["outputs"]}
            if name not in dims:
                raise UnsupportedError(f"the onnx target does not know function input {name!r}")
            self.inputs[name] = self.g.add_input(name, NUMPY_DTYPES[dtype], dims[name])
        return self.inputs[name]

    def param_of(self, v: Value) -> str | None:
        ref = self.env[(id(v.node), v.index)]
        return ref.name if isinstance(ref, ParamRef) else None

    def float_param(self, name: str, dtype: Any = None) -> str:
        """A float param as an initializer in its stored dtype (cast to ``dtype`` in the graph)."""
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

    # -- ops -----------------------------------------------------------------------------
    def _embedding(self, node: Node) -> list[str]:
        table, ids = node.inputs
        name = self.param_of(table)
        ids_name = self.value(ids)
        if name is not None and isinstance(self.weights[name], QuantizedTensor):
            return [self.quant_param(name).rows(ids_name)]
        table_name = self.float_param(name) if name is not None else self.value(table)
        rows = self.g.one("Gather", [table_name, ids_name], axis=0)
        if name is not None and np.asarray(self.weights[name]).dtype != np.float32:
            rows = self.g.one("Cast", [rows], to=1)
        return [rows]

    def _norm_weight(self, v: Value) -> str:
        name = self.param_of(v)
        return self.float_param(name, np.float32) if name is not None else self.value(v)

    def _rms_norm(self, node: Node) -> list[str]:
        x, w = node.inputs
        return [self.g.one("RMSNormalization", [self.value(x), self._norm_weight(w)], axis=-1,
                           epsilon=float(node.attrs["eps"]), stash_type=1)]  # type: ignore[arg-type]

    def _add_rms_norm(self, node: Node) -> list[str]:
        x, residual, w = node.inputs
        out, total = self.g.fresh("normed"), self.g.fresh("residual")
        self.g.node("SkipSimplifiedLayerNormalization", [self.value(x), self.value(residual), self._norm_weight(w)],
                    outputs=[out, "", "", total], domain=MS_DOMAIN, epsilon=float(node.attrs["eps"]))  # type: ignore[arg-type]
        return [out, total]

    def _linear(self, node: Node) -> list[str]:
        x, w = node.inputs
        name = self.param_of(w)
        xs = self.value(x)
        if name is not None and isinstance(self.weights[name], QuantizedTensor):
            quant = self.quant_param(name)
            if quant.uses_matmulnbits(self.accuracy_level):
                self.stats.matmulnbits += 1
            else:
                self.stats.dequant_linear += 1
            return [quant.linear(xs, self.accuracy_level)]
        self.stats.float_linear += 1
        weight = self.float_param(name, np.float32) if name is not None else self.value(w)
        return [self.g.one("Gemm", [xs, weight], transB=1)]

    def _split(self, node: Node) -> list[str]:
        sizes = [int(s) for s in node.attrs["sizes"]]  # type: ignore[union-attr]
        return self.g.node("Split", [self.value(node.inputs[0]), self.g.const(sizes)], len(sizes), axis=-1)

    def _split_heads(self, node: Node) -> list[str]:
        heads, dim = int(node.attrs["heads"]), int(node.attrs["head_dim"])  # type: ignore[call-overload]
        flat = self.value(node.inputs[0])
        out = self.g.one("Reshape", [flat, self.g.const([-1, heads, dim])])
        self._flat[out] = flat
        return [out]

    def _merge_heads(self, node: Node) -> list[str]:
        t = node.inputs[0].type
        width = int(t.shape[1]) * int(t.shape[2])
        x = self.value(node.inputs[0])
        return [self.g.one("Reshape", [self._flat.get(x, x), self.g.const([-1, width])])]

    def _silu(self, node: Node) -> list[str]:
        return [self._silu_of(self.value(node.inputs[0]))]

    def _silu_of(self, x: str) -> str:
        return self.g.one("Mul", [x, self.g.one("Sigmoid", [x])], hint="silu")

    def _binary(self, op: str) -> Callable[[Node], list[str]]:
        return lambda node: [self.g.one(op, [self.value(v) for v in node.inputs])]

    def _gather_rows(self, node: Node) -> list[str]:
        x, idx = node.inputs
        return [self.g.one("Gather", [self.value(x), self.value(idx)], axis=0)]

    def _swiglu(self, node: Node) -> list[str]:
        width = int(node.inputs[0].type.shape[1])
        gate, up = self.g.node("Split", [self.value(node.inputs[0]), self.g.const([width // 2, width // 2])], 2,
                               axis=-1)
        return [self.g.one("Mul", [self._silu_of(gate), up], hint="swiglu")]

    # -- rope ----------------------------------------------------------------------------
    def _rope_key(self, attrs: dict[str, Any]) -> tuple:
        return tuple(attrs.get(k) for k in ROPE_KEYS)

    def _rope_table(self, attrs: dict[str, Any]) -> tuple[str, str]:
        """cos/sin ``[max_position, rotary_dim / 2]`` float32 for these rope settings."""
        key = self._rope_key(attrs)
        if key not in self._rope_tables:
            cos, sin = cos_sin(np.arange(self.config.max_position), attrs)
            self._rope_tables[key] = (self.g.weight("rope.cos", cos.astype(np.float32)),
                                      self.g.weight("rope.sin", sin.astype(np.float32)))
        return self._rope_tables[key]

    def _rope(self, node: Node) -> list[str]:
        x, pos = node.inputs
        return [self._apply_rope(self.value(x), self.value(pos), node.attrs, int(x.type.shape[2]))]

    def _apply_rope(self, x: str, pos: str, attrs: dict[str, Any], head_dim: int) -> str:
        """RoPE with standard ops on ``x [tokens, heads, head_dim]`` (same arithmetic as the torch target)."""
        g = self.g
        rot = int(attrs["rotary_dim"])
        half = rot // 2
        interleaved = attrs["style"] == "interleaved"
        key = (*self._rope_key(attrs), pos)
        if key not in self._rope_rows:
            cos_table, sin_table = self._rope_table(attrs)
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

    # -- attention -----------------------------------------------------------------------
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

    def gqa_rotary_ok(self, attrs: dict[str, Any], head_dim: int) -> bool:
        """Whether GroupQueryAttention's own rotary kernel accepts these sizes (head % 16, rot/2 % 8)."""
        return head_dim % 16 == 0 and (int(attrs["rotary_dim"]) // 2) % 8 == 0

    def _attention(self, node: Node) -> list[str]:
        q, k, v = node.inputs[:3]
        attrs = node.attrs
        hq, hd = int(q.type.shape[1]), int(q.type.shape[2])
        hkv = int(k.type.shape[1])
        if hd % 8:
            raise UnsupportedError(f"GroupQueryAttention needs a head size that is a multiple of 8, got {hd}")
        layer = int(attrs["layer"])  # type: ignore[call-overload]
        if layer in self.stats.layers:
            raise UnsupportedError(f"two attention ops write kv layer {layer}")
        self.stats.layers.append(layer)
        packed = self._packed.get(node)
        if packed is not None:
            qs = ks = vs = self.value(packed)
        else:
            qs, ks, vs = self.value(q), self.value(k), self.value(v)
        rotary: tuple[str, str] | None = None
        if node.op == "rope_attention":
            if self.gqa_rotary_ok(attrs, hd):
                rotary = self._rope_table(attrs)
                self.stats.gqa_rotary += 1
            else:
                pos = self.value(node.inputs[3])
                qs, ks = self._apply_rope(qs, pos, attrs, hd), self._apply_rope(ks, pos, attrs, hd)
        g = self.g
        seqlens = self._seqlens()
        for kind in ("key", "value"):
            g.add_input(past_name(layer, kind), np.float32, ["batch", hkv, "past_sequence_length", hd])
        if packed is not None:  # query = [batch, seq, (hq + 2 hkv) * hd]; key, value absent
            self.stats.packed_qkv += 1
            qkv = [g.one("Reshape", [qs, self._batch_shape((hq + 2 * hkv) * hd)]), "", ""]
        else:
            qkv = [g.one("Reshape", [self._flat.get(qs, qs), self._batch_shape(hq * hd)]),
                   g.one("Reshape", [self._flat.get(ks, ks), self._batch_shape(hkv * hd)]),
                   g.one("Reshape", [self._flat.get(vs, vs), self._batch_shape(hkv * hd)])]
        inputs = [*qkv, past_name(layer, "key"), past_name(layer, "value"), seqlens,
                  self.inputs["total_sequence_length"]]
        if rotary is not None:
            inputs += list(rotary)
        out = g.fresh(f"attn{layer}")
        g.node("GroupQueryAttention", inputs, outputs=[out, present_name(layer, "key"), present_name(layer, "value")],
               domain=MS_DOMAIN, num_heads=hq, kv_num_heads=hkv, scale=float(attrs["scale"]),  # type: ignore[arg-type]
               do_rotary=int(rotary is not None),
               rotary_interleaved=int(rotary is not None and attrs["style"] == "interleaved"))
        heads = g.one("Reshape", [out, g.const([-1, hq, hd])])
        self._flat[heads] = out  # merge_heads reshapes GQA's [batch, seq, hq*hd] output directly
        return [heads]
