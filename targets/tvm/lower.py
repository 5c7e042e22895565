"""Lowering llmc IR to a TVM Relax module (``tvm.relax.frontend.nn``) over TVM's paged KV cache.

Every IR function becomes a Relax function of the same name taking the flattened tokens of a
step (``input_ids [tokens]``, and ``logits_index [outputs]`` for ``prefill``), the KV cache
object and the packed params, and returning ``(logits, kv_cache)``. A third function,
``create_paged_kv_cache``, builds the cache (``TIRPagedKVCache``); the ``nn.Module`` that
carries them is in :mod:`llmc.targets.tvm.model`.

Each node goes through the op table :data:`TVM_OPS`. Attention goes through
``attention_with_fused_qkv``: the cache appends k and v and applies RoPE itself
(:mod:`llmc.targets.tvm.rope`), so the table lowers ``rope_attention`` (made by the ``fold-rope``
rewrite the target asks for) and refuses a separate ``rope`` or plain ``attention``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.targets.lowering import LoweringTable, Refusal
from llmc.targets.tvm.model import DECODE_ONE, build_model_class
from llmc.targets.tvm.rope import RopePlan, check_positions, input_node, rope_plan
from llmc.targets.tvm.support import check_cuda_decode_attention, check_functions

__all__ = ["DECODE_ONE", "TVM_OPS", "Lowered", "lower_module"]


@dataclass
class Lowered:
    """The Relax module and how to feed it."""

    mod: Any  # tvm.IRModule
    param_slots: list[tuple[str, str]]  # (IR param name, part) in the VM's packed order
    functions: list[str]
    kv_dtype: str
    num_layers: int
    rope: RopePlan
    notes: list[str] = field(default_factory=list)


def lower_module(module: Module, target: Any) -> Lowered:
    """Lower ``module`` to a Relax ``IRModule`` for the TVM ``target``."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

    check_functions(module)
    TVM_OPS.check_module(module)
    if target.kind.name == "cuda":
        check_cuda_decode_attention(module.config)
    plan = rope_plan(module)
    model = build_model_class(module, plan, target, _run_function)()
    functions = [name for name in ("prefill", "decode") if name in module.functions]
    if "decode" in functions:
        functions.append(DECODE_ONE)
    spec: dict[str, Any] = {}
    for name in functions:
        fn_spec: dict[str, Any] = {
            "input_ids": nn.spec.Tensor([1] if name == DECODE_ONE else ["tokens"], "int32"),
        }
        if name == "prefill":
            fn_spec["logits_index"] = nn.spec.Tensor(["outputs"], "int32")
        fn_spec["paged_kv_cache"] = nn.spec.Object(object_type=PagedKVCache)
        fn_spec["$"] = {"param_mode": "packed", "effect_mode": "none"}
        spec[name] = fn_spec
    spec["create_paged_kv_cache"] = {
        "max_batch_size": int,
        "max_total_seq_len": int,
        "prefill_chunk_size": int,
        "page_size": int,
        "$": {"param_mode": "none", "effect_mode": "none"},
    }
    mod, named_params = model.export_tvm(spec=spec)
    slots = [model.slot_of[name.split(".", 1)[1]] for name, _ in named_params]
    notes = [f"rope: {plan.style} via TVM "
             f"{plan.rope_scaling.get('rope_type', 'default')} rope"
             + (" with q/k rotary dims permuted to rotate-half" if plan.permute else "")]
    return Lowered(mod, slots, functions, model.kv_dtype, int(module.config["num_layers"]), plan, notes)


def _run_function(model: Any, fn: Function, feeds: dict[str, Any], kv: Any, permute: bool) -> Any:
    return FunctionLowering(model, fn, feeds, kv, permute).run()


@dataclass(frozen=True)
class ParamRef:
    """A module param, lowered by the op that reads it (float or quantized)."""

    name: str


class FunctionLowering:
    """Emits one IR function's nodes as ``nn`` ops inside ``export_tvm``'s tracing."""

    def __init__(self, model: Any, fn: Function, feeds: dict[str, Any], kv: Any, permute: bool) -> None:
        self.model, self.fn, self.feeds, self.kv, self.permute = model, fn, feeds, kv, permute
        self.env: dict[int, tuple[Any, ...]] = {}
        self.positions = input_node(fn, "positions")

    def get(self, value: Value) -> Any:
        return self.env[id(value.node)][value.index]

    def args(self, node: Node) -> list[Any]:
        return [self.get(v) for v in node.inputs]

    def run(self) -> Any:
        for node in self.fn.nodes:
            if node.op == "input":
                name = str(node.attrs["name"])
                # the cache object is passed to attention; positions come from it
                out = None if name in ("kv_cache", "positions") else self.feeds[name]
            elif node.op == "param":
                out = ParamRef(str(node.attrs["name"]))
            else:
                out = TVM_OPS.handler(node.op)(self, node)
            self.env[id(node)] = out if isinstance(out, tuple) else (out,)
        (logits,) = (self.get(v) for v in self.fn.outputs.values())
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def param(self, ref: Any) -> tuple[str, dict[str, Any]]:
        """A param's name and its VM tensors by part (in llmc's packed-layout order for quantized ones)."""
        if not isinstance(ref, ParamRef):
            raise UnsupportedError("weights must be module params for the tvm target")
        return ref.name, self.model.tensors[ref.name]

    def param_info(self, name: str) -> Any:
        return self.model.module_params[name]

    def embedding(self, table_ref: Any, ids: Any, dtype: str) -> Any:
        from tvm.relax.frontend import nn

        from llmc.targets.tvm.quant import quantized_embedding

        name, parts = self.param(table_ref)
        info = self.param_info(name)
        if info.quant is not None:
            return quantized_embedding(ids, list(parts.values()), info.quant, tuple(info.type.shape),
                                       dtype)
        rows = nn.op.take(parts["weight"], ids, axis=0)
        return rows if rows.dtype == dtype else rows.astype(dtype)

    def rms_norm(self, x: Any, weight_ref: Any, eps: float) -> Any:
        from tvm.relax.frontend import nn

        _, parts = self.param(weight_ref)
        w = parts["weight"]
        if w.dtype != x.dtype:
            w = w.astype(x.dtype)
        return nn.op.rms_norm(x, w, axes=[-1], epsilon=eps)

    def linear(self, x: Any, weight_ref: Any) -> Any:
        from llmc.targets.tvm.quant import float_linear, quantized_linear

        name, parts = self.param(weight_ref)
        info = self.param_info(name)
        if info.quant is not None:
            return quantized_linear(x, list(parts.values()), info.quant, tuple(info.type.shape),
                                    name.replace(".", "_"), nibble_pairs=self.model.nibble_pairs)
        return float_linear(x, parts["weight"], name.replace(".", "_"))

    def attention(self, node: Node) -> Any:
        from tvm.relax.frontend import nn

        check_positions(node, self.positions)
        q, k, v = (self.get(x) for x in node.inputs[:3])
        if self.permute:
            q = nn.op.take(q, self.model.perm, axis=2)
            k = nn.op.take(k, self.model.perm, axis=2)
        tokens, n_q, head_dim = q.shape[0], int(q.shape[1]), int(q.shape[2])
        qkv = nn.op.concat([q, k, v], dim=1)
        qkv = nn.op.reshape(qkv, (1, tokens, int(qkv.shape[1]), head_dim))
        out = self.kv.attention_with_fused_qkv(int(node.attrs["layer"]), qkv, n_q,  # type: ignore[call-overload]
                                               sm_scale=float(node.attrs["scale"]))  # type: ignore[arg-type]
        return nn.op.reshape(out, (tokens, n_q, head_dim))


Handler = Callable[[FunctionLowering, Node], Any]
"""Lowers one node: ``(function lowering, node) -> nn tensor(s)``."""


def _nn() -> Any:
    from tvm.relax.frontend import nn

    return nn


def _split(fl: FunctionLowering, node: Node) -> Any:
    sizes = [int(s) for s in node.attrs["sizes"]]  # type: ignore[union-attr]
    bounds = list(np.cumsum(sizes)[:-1].tolist())
    return tuple(_nn().op.split(fl.get(node.inputs[0]), bounds, axis=1))


def _split_heads(fl: FunctionLowering, node: Node) -> Any:
    x = fl.get(node.inputs[0])
    return _nn().op.reshape(x, (x.shape[0], int(node.attrs["heads"]), int(node.attrs["head_dim"])))  # type: ignore[call-overload]


def _merge_heads(fl: FunctionLowering, node: Node) -> Any:
    x = fl.get(node.inputs[0])
    return _nn().op.reshape(x, (x.shape[0], int(x.shape[1]) * int(x.shape[2])))


def _add_rms_norm(fl: FunctionLowering, node: Node) -> Any:
    x, residual, w = fl.args(node)
    total = x + residual
    return fl.rms_norm(total, w, float(node.attrs["eps"])), total  # type: ignore[arg-type]


def _swiglu(fl: FunctionLowering, node: Node) -> Any:
    gate, up = _nn().op.split(fl.get(node.inputs[0]), 2, axis=1)
    return _nn().op.silu(gate) * up


_FOLD_ROPE = ("the tvm target applies RoPE inside its KV cache, so attention must be rope_attention "
              "(the fold-rope rewrite the target asks for folds rope(q), rope(k) into it)")

TVM_OPS: LoweringTable[Handler] = LoweringTable("tvm", {
    "embedding": lambda fl, n: fl.embedding(fl.get(n.inputs[0]), fl.get(n.inputs[1]), str(n.attrs["dtype"])),
    "rms_norm": lambda fl, n: fl.rms_norm(fl.get(n.inputs[0]), fl.get(n.inputs[1]), float(n.attrs["eps"])),  # type: ignore[arg-type]
    "add_rms_norm": _add_rms_norm,
    "linear": lambda fl, n: fl.linear(fl.get(n.inputs[0]), fl.get(n.inputs[1])),
    "split": _split,
    "split_heads": _split_heads,
    "merge_heads": _merge_heads,
    "rope": Refusal(f"{_FOLD_ROPE}; this rope result is not folded (it feeds something other than attention, or "
                    "q and k use different rope settings)"),
    "attention": Refusal(f"{_FOLD_ROPE}; this layer's q and k are not two rope ops with the same settings"),
    "rope_attention": lambda fl, n: fl.attention(n),
    "packed_rope_attention": Refusal("TVM's paged KV cache takes q, k and v concatenated by this lowering; the "
                                     "pack-qkv-attention rewrite is for ONNX Runtime's GroupQueryAttention"),
    "silu": lambda fl, n: _nn().op.silu(fl.get(n.inputs[0])),
    "mul": lambda fl, n: fl.get(n.inputs[0]) * fl.get(n.inputs[1]),
    "add": lambda fl, n: fl.get(n.inputs[0]) + fl.get(n.inputs[1]),
    "swiglu": _swiglu,
    "gather_rows": lambda fl, n: _nn().op.take(fl.get(n.inputs[0]), fl.get(n.inputs[1]), axis=0),
})
"""The tvm target's lowering: op -> handler ``(function lowering, node) -> nn tensor(s)``."""
