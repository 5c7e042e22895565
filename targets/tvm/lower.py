"""Lowering llmc IR to a TVM Relax module (``tvm.relax.frontend.nn``) over llmc's paged KV cache.

Every IR function becomes a Relax function of the same name (and ``decode`` one more per batch
bucket, ``decode_b{N}``: :mod:`llmc.targets.tvm.model`) taking the flattened tokens of a step and
its page tables (:mod:`llmc.targets.tvm.paged`), the KV pages of every layer and the packed
params, and returning the logits.

Each node goes through the op table :data:`TVM_OPS`. Attention is TVM's paged attention kernels
called from the graph (:func:`llmc.targets.tvm.paged.paged_attention`): RoPE is applied to q and k
by TVM's rope kernel (:mod:`llmc.targets.tvm.rope`), so the table lowers ``rope_attention`` (made
by the ``fold-rope`` rewrite the target asks for) and refuses a separate ``rope`` or plain
``attention``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.targets.lowering import LoweringTable, Refusal
from llmc.targets.tvm.model import DECODE_ONE, activation_dtype, bucket_name, build_model_class
from llmc.targets.tvm.paged import DECODE_INPUTS, PREFILL_INPUTS, paged_attention, paged_kernels
from llmc.targets.tvm.rope import RopePlan, check_positions, input_node, rope_plan
from llmc.targets.tvm.support import check_cuda_decode_attention, check_functions
from llmc.targets.tvm.tirfix import inline_let_expressions

__all__ = ["DECODE_ONE", "TVM_OPS", "Lowered", "lower_module"]

PAGE_SIZE = 16


@dataclass
class Lowered:
    """The Relax module and how to feed it."""

    mod: Any  # tvm.IRModule
    param_slots: list[tuple[str, str]]  # (IR param name, part) in the VM's packed order
    functions: list[str]
    kv_dtype: str
    num_layers: int
    rope: RopePlan
    page_size: int
    buckets: list[int]
    notes: list[str] = field(default_factory=list)


def lower_module(module: Module, target: Any, buckets: tuple[int, ...] = (1,), page_size: int = PAGE_SIZE) -> Lowered:
    """Lower ``module`` to a Relax ``IRModule`` for the TVM ``target``, with a static decode function
    for each batch size in ``buckets`` (when the module has ``decode``)."""
    from tvm.relax.frontend import nn

    check_functions(module)
    TVM_OPS.check_module(module)
    if target.kind.name == "cuda":
        check_cuda_decode_attention(module.config)
    config = module.config
    n_layers, n_q, n_kv = int(config["num_layers"]), int(config["num_heads"]), int(config["num_kv_heads"])
    head_dim = int(config["head_dim"])
    plan = rope_plan(module)
    kv_dtype = activation_dtype(module)
    kernels = paged_kernels(target, n_q, n_kv, head_dim, kv_dtype, plan.theta, dict(plan.rope_scaling),
                            plan.rotary_dim, _attention_scale(module), page_size)
    has_decode = "decode" in module.functions
    buckets = sorted(set(buckets)) if has_decode else []
    model = build_model_class(module, plan, target, kernels, _run_function, buckets)()
    pages = [nn.spec.Tensor(["num_pages", 2, n_kv, page_size, head_dim], kv_dtype) for _ in range(n_layers)]
    spec: dict[str, Any] = {"prefill": _step_spec(PREFILL_INPUTS, "tokens", "seqs", pages)}
    if has_decode:
        spec["decode"] = _step_spec(DECODE_INPUTS, "batch", "batch", pages)
        for b in buckets:
            spec[bucket_name(b)] = _step_spec(DECODE_INPUTS, b, b, pages)
    mod, named_params = model.export_tvm(spec=spec)
    for b in buckets:
        # every input of a bucket function is a tensor the executor keeps and updates in place: static for
        # RewriteCUDAGraph, so the whole step (embedding to logits, attention included) is one capture
        name = bucket_name(b)
        mod[name] = mod[name].with_attr("num_input", 0)
    mod, _ = inline_let_expressions(mod)  # TVM's TIR CSE mishandles them (llama3 RoPE on CUDA): see tirfix
    slots = [model.slot_of[name.split(".", 1)[1]] for name, _ in named_params]
    notes = [f"rope: {plan.style} via TVM "
             f"{plan.rope_scaling.get('rope_type', 'default')} rope"
             + (" with q/k rotary dims permuted to rotate-half" if plan.permute else ""),
             f"paged attention: TVM's TIR kernels over llmc's page tables ({page_size}-token pages)"]
    if buckets:
        notes.append(f"static decode buckets: {', '.join(map(str, buckets))}")
    functions = ["prefill", *(["decode"] if has_decode else []), *(bucket_name(b) for b in buckets)]
    return Lowered(mod, slots, functions, kv_dtype, n_layers, plan, page_size, buckets, notes)


def _step_spec(names: tuple[str, ...], tokens: int | str, seqs: int | str, pages: list[Any]) -> dict[str, Any]:
    """``export_tvm`` spec of a step function: int32 inputs (per token, per sequence, or the page list),
    the pages of every layer, the packed params."""
    from tvm.relax.frontend import nn

    plus_one = seqs + 1 if isinstance(seqs, int) else f"{seqs}_plus_one"
    shapes = {"page_indptr": plus_one, "q_indptr": plus_one, "last_page_len": seqs, "page_values": "num_page_refs",
              "logits_index": "outputs"}
    spec: dict[str, Any] = {name: nn.spec.Tensor([shapes.get(name, tokens)], "int32") for name in names}
    spec["pages"] = list(pages)
    spec["$"] = {"param_mode": "packed", "effect_mode": "none"}
    return spec


def _attention_scale(module: Module) -> float:
    """The softmax scale every ``rope_attention`` shares (checked)."""
    scales = {float(n.attrs["scale"]) for fn in module for n in fn.nodes if n.op == "rope_attention"}
    if len(scales) != 1:
        raise UnsupportedError(f"the tvm target needs one attention scale for all layers, found {sorted(scales)}")
    return scales.pop()


def _run_function(model: Any, fn: Function, inputs: dict[str, Any], pages: list[Any], permute: bool,
                  decode: bool) -> Any:
    return FunctionLowering(model, fn, inputs, pages, permute, decode).run()


@dataclass(frozen=True)
class ParamRef:
    """A module param, lowered by the op that reads it (float or quantized)."""

    name: str


class FunctionLowering:
    """Emits one IR function's nodes as ``nn`` ops inside ``export_tvm``'s tracing."""

    def __init__(self, model: Any, fn: Function, inputs: dict[str, Any], pages: list[Any], permute: bool,
                 decode: bool) -> None:
        self.model, self.fn, self.inputs, self.pages, self.permute = model, fn, inputs, pages, permute
        self.decode = decode
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
                # the cache is the pages; positions are read by the attention (rope) from the step inputs
                out = None if name in ("kv_cache", "positions") else self.inputs[name]
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
        n_q, n_kv, head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[2])
        layer = int(node.attrs["layer"])
        qkv = nn.op.concat([q, k, v], dim=1)
        out, self.pages[layer] = paged_attention(self.model.kernels, qkv, self.pages[layer], self.inputs, n_q, n_kv,
                                                 head_dim, self.decode)
        return out


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
