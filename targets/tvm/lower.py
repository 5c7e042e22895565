"""Lowering llmc IR to a TVM Relax module (``tvm.relax.frontend.nn``) over TVM's paged KV cache.

Every IR function becomes a Relax function of the same name taking the flattened tokens of a
step (``input_ids [tokens]``, and ``logits_index [outputs]`` for ``prefill``), the KV cache
object and the packed params, and returning ``(logits, kv_cache)``. A third function,
``create_paged_kv_cache``, builds the cache (``TIRPagedKVCache``).

Attention goes through ``attention_with_fused_qkv``: the cache appends k and v, applies RoPE
itself (``RopeMode.NORMAL``: rotate q, rotate k before it is stored) and computes positions from
the sequence lengths given to ``begin_forward``, so the IR's ``positions`` input is not needed.
RoPE is therefore folded into attention: ``rope_attention`` directly, and ``attention`` whose q
and k are ``rope`` results. The IR's two rope styles map as follows:

* ``half`` (NEOX/HF, rotate ``(x[i], x[i + r/2])``): TVM's default rope, with or without
  Llama 3 frequency scaling (TVM's ``rope_freq_llama3`` is the same formula as
  :func:`llmc.compiler.ir.rope.inv_frequencies`).
* ``interleaved`` (GGML/Meta, rotate ``(x[2i], x[2i+1])``): TVM's ``gptj`` rope type when there
  is no frequency scaling. TVM has no interleaved Llama 3 rope, so with scaling the rotary dims
  of q and k are permuted (evens first, then odds) before the cache: rotate-half of the
  permuted vector equals the permuted interleaved rotation, dot products q.k are unchanged by a
  common permutation, and v (hence the attention output) is not permuted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.ops import ROPE_OPTIONAL
from llmc.compiler.ir.types import QuantSpec

FUSED_OPS = frozenset({"add_rms_norm", "swiglu", "rope_attention"})
LOWERED_OPS = frozenset({
    "input", "param", "embedding", "rms_norm", "add_rms_norm", "linear", "split", "split_heads",
    "merge_heads", "rope", "attention", "rope_attention", "silu", "mul", "add", "swiglu", "gather_rows",
})
FUNCTION_INPUTS = {"prefill": ("input_ids", "logits_index"), "decode": ("input_ids",)}
DECODE_ONE = "decode_1"
"""``decode`` specialised to one sequence: static shapes, so schedules (dlight GEMV) and
meta-schedule tuning apply to its matrix-vector products."""


@dataclass(frozen=True)
class RopePlan:
    """How the IR's RoPE is realised by TVM's KV cache."""

    theta: float
    rotary_dim: int
    style: str
    rope_scaling: dict[str, Any]
    permute: bool

    def to_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "rotary_dim": self.rotary_dim, "style": self.style,
                "rope_scaling": dict(self.rope_scaling), "permute_qk": self.permute}


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


def _rope_key(attrs: dict[str, Any]) -> tuple:
    return tuple(attrs.get(k) for k in ("theta", "style", "rotary_dim", *ROPE_OPTIONAL))


def _attention_operands(node: Node, positions: Node | None) -> tuple[Value, Value, Value, dict[str, Any]]:
    """(pre-rope q, pre-rope k, v, rope attrs) of an attention node whose RoPE can be folded."""
    if node.op == "rope_attention":
        q, k, v, pos = node.inputs[:4]
        if positions is None or pos.node is not positions:
            raise UnsupportedError(f"{node}: rope positions must be the function's `positions` input")
        return q, k, v, dict(node.attrs)
    q, k, v = node.inputs[:3]
    qn, kn = q.node, k.node
    if qn.op != "rope" or kn.op != "rope" or _rope_key(qn.attrs) != _rope_key(kn.attrs):
        raise UnsupportedError(
            f"the tvm target applies RoPE inside its KV cache; attention layer {node.attrs['layer']} "
            "must read q and k straight from two rope ops with the same attributes"
        )
    for r in (qn, kn):
        if positions is None or r.inputs[1].node is not positions:
            raise UnsupportedError(f"{r}: rope positions must be the function's `positions` input")
    return qn.inputs[0], kn.inputs[0], v, dict(qn.attrs)


def rope_plan(module: Module) -> RopePlan:
    """The one RoPE setting every attention layer of ``module`` shares (checked)."""
    keys: dict[tuple, dict[str, Any]] = {}
    for fn in module:
        positions = _input_node(fn, "positions")
        for node in fn.nodes:
            if node.op in ("attention", "rope_attention"):
                attrs = _attention_operands(node, positions)[3]
                keys[_rope_key(attrs)] = attrs
    if len(keys) != 1:
        raise UnsupportedError(f"the tvm target needs one RoPE setting for all layers, found {len(keys)}")
    attrs = next(iter(keys.values()))
    style = str(attrs["style"])
    scaling: dict[str, Any] = {}
    if attrs.get("scaling") == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": float(attrs["factor"]),
            "low_freq_factor": float(attrs["low_freq_factor"]),
            "high_freq_factor": float(attrs["high_freq_factor"]),
            "original_max_position_embeddings": float(attrs["original_max_position"]),
        }
    elif attrs.get("scaling") is not None:
        raise UnsupportedError(f"the tvm target does not support rope scaling {attrs.get('scaling')!r}")
    permute = False
    if style == "interleaved":
        if scaling:
            permute = True
        else:
            scaling = {"rope_type": "gptj"}
    return RopePlan(float(attrs["theta"]), int(attrs["rotary_dim"]), style, scaling, permute)


def interleaved_to_half(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Head-dim permutation taking interleaved rotary pairs to rotate-half layout."""
    rot = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)])
    return np.concatenate([rot, np.arange(rotary_dim, head_dim)]).astype(np.int32)


def _input_node(fn: Function, name: str) -> Node | None:
    for node in fn.inputs:
        if node.attrs["name"] == name:
            return node
    return None


def check_supported(module: Module) -> None:
    """Raise :class:`UnsupportedError` naming the first op or function the target cannot lower."""
    for fn in module:
        if fn.name not in FUNCTION_INPUTS:
            raise UnsupportedError(f"the tvm target lowers functions prefill and decode, not {fn.name!r}")
        for node in fn.nodes:
            if node.op not in LOWERED_OPS:
                raise UnsupportedError(f"the tvm target cannot lower op {node.op!r} (function {fn.name})")
    if "prefill" not in module.functions:
        raise UnsupportedError("the module has no prefill function")


CUDA_MAX_BLOCK_Z = 64


def check_cuda_decode_attention(config: dict[str, Any]) -> None:
    """Refuse shapes for which TVM's paged decode-attention kernel cannot launch on CUDA.

    TVM 0.27 (``relax/frontend/nn/llm/_decode_kernels.py``) fills a block of 512 threads as
    ``(head_dim / 4, group, 512 / (head_dim / 4 * group))`` (its vector width assumes 2-byte
    q/k/v whatever the dtype) and checks ``threadIdx.z`` against 64 only for WebGPU; on CUDA a
    larger z fails at run time with CUDA_ERROR_INVALID_VALUE. Tiny heads (head_dim 8) hit it.
    """
    head_dim, group = int(config["head_dim"]), int(config["num_heads"]) // int(config["num_kv_heads"])
    bdx, bdy = max(1, head_dim // 4), group
    while bdx * bdy > 512 and bdy > 1:
        bdy //= 2
    bdz = max(512, bdx * bdy) // (bdx * bdy)
    if bdz > CUDA_MAX_BLOCK_Z:
        raise UnsupportedError(
            f"TVM's CUDA decode-attention kernel would launch blocks of ({bdx}, {bdy}, {bdz}) threads for "
            f"head_dim {head_dim} with {group} query heads per kv head; CUDA allows at most {CUDA_MAX_BLOCK_Z} "
            "threads in z (head_dim x group must be >= 32); use the torch target on CUDA for this model")


def lower_module(module: Module, target: Any) -> Lowered:
    """Lower ``module`` to a Relax ``IRModule`` for the TVM ``target``."""
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

    check_supported(module)
    if target.kind.name == "cuda":
        check_cuda_decode_attention(module.config)
    plan = rope_plan(module)
    model = _build_model_class(module, plan, target)()
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


def _param_parts(name: str, info: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(part, shape, dtype) of each tensor a param is stored as."""
    shape = tuple(int(d) for d in info.type.shape)
    quant: QuantSpec | None = info.quant
    if quant is None:
        return [("weight", shape, info.type.dtype)]
    out, inp = shape
    groups = -(-inp // quant.group_size)
    packed = inp if quant.bits == 8 else inp // 2
    parts = [("qdata", (out, packed), "uint8"), ("scales", (out, groups), quant.scale_dtype)]
    if not quant.symmetric:
        parts.append(("offsets", (out, groups), quant.scale_dtype))
    return parts


def _build_model_class(module: Module, plan: RopePlan, target: Any) -> type:
    """An ``nn.Module`` class whose methods run the IR functions of ``module``."""
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    config = module.config
    n_layers, n_q, n_kv = int(config["num_layers"]), int(config["num_heads"]), int(config["num_kv_heads"])
    head_dim = int(config["head_dim"])
    used = sorted(module.referenced_params())
    kv_dtype = _activation_dtype(module)
    perm = interleaved_to_half(head_dim, plan.rotary_dim) if plan.permute else None

    class LlmcModel(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            self.kv_dtype = kv_dtype
            self.nibble_pairs = target.kind.name == "llvm"  # 4-bit matmuls over code bytes (quantized_linear)
            self.module_params = module.params
            self.weights = nn.ParameterDict()
            self.slot_of: dict[str, tuple[str, str]] = {}
            self.tensors: dict[str, dict[str, Any]] = {}
            for index, name in enumerate(used):
                parts = {}
                for part, shape, dtype in _param_parts(name, module.params[name]):
                    key = f"p{index}_{part}"
                    self.weights[key] = nn.Parameter(shape, dtype)
                    self.slot_of[key] = (name, part)
                    parts[part] = self.weights[key]
                self.tensors[name] = parts
            self.perm = None if perm is None else nn.Tensor.from_const(perm)

        def create_paged_kv_cache(self, max_batch_size: Any, max_total_seq_len: Any, prefill_chunk_size: Any,
                                  page_size: Any) -> Any:
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=0,
                layer_partition=relax.ShapeExpr([0, n_layers]), num_hidden_layers=n_layers,
                num_attention_heads=n_q, num_key_value_heads=n_kv, qk_head_dim=head_dim, v_head_dim=head_dim,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL,
                rope_scale=1, rope_theta=plan.theta, rope_scaling=dict(plan.rope_scaling),
                rope_ext_factors=relax.prim_value(0), rotary_dim=plan.rotary_dim, enable_disaggregation=False,
                dtype=kv_dtype, target=target,
            )

        def prefill(self, input_ids: Any, logits_index: Any, paged_kv_cache: Any) -> Any:
            return self._run("prefill", {"input_ids": input_ids, "logits_index": logits_index}, paged_kv_cache)

        def decode(self, input_ids: Any, paged_kv_cache: Any) -> Any:
            return self._run("decode", {"input_ids": input_ids}, paged_kv_cache)

        def decode_1(self, input_ids: Any, paged_kv_cache: Any) -> Any:
            return self._run("decode", {"input_ids": input_ids}, paged_kv_cache)

        def _run(self, fn_name: str, feeds: dict[str, Any], kv: Any) -> Any:
            fn = module.functions[fn_name]
            logits = _FunctionLowering(self, fn, feeds, kv, perm is not None).run()
            return logits, kv

    # the weights dict is registered under this attribute name
    LlmcModel.__name__ = "LlmcModel"
    return LlmcModel


def _activation_dtype(module: Module) -> str:
    for fn in module:
        for node in fn.nodes:
            if node.op == "embedding":
                return str(node.attrs["dtype"])
    return "float32"


@dataclass(frozen=True)
class _ParamRef:
    """A module param, lowered by the op that reads it (float or quantized)."""

    name: str


class _Rope:
    """A rope result waiting to be folded into the attention that reads it."""

    def __init__(self, node: Node) -> None:
        self.node = node


class _FunctionLowering:
    """Emits one IR function's nodes as ``nn`` ops inside ``export_tvm``'s tracing."""

    def __init__(self, model: Any, fn: Function, feeds: dict[str, Any], kv: Any, permute: bool) -> None:
        self.model, self.fn, self.feeds, self.kv, self.permute = model, fn, feeds, kv, permute
        self.env: dict[int, tuple[Any, ...]] = {}
        self.positions = _input_node(fn, "positions")

    def get(self, value: Value) -> Any:
        result = self.env[id(value.node)][value.index]
        if isinstance(result, _Rope):
            raise UnsupportedError(f"{value.node} feeds {result.node.op} results to something other than attention")
        return result

    def run(self) -> Any:
        for node in self.fn.nodes:
            out = self.lower(node)
            self.env[id(node)] = out if isinstance(out, tuple) else (out,)
        (logits,) = (self.get(v) for v in self.fn.outputs.values())
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def lower(self, node: Node) -> Any:
        from tvm.relax.frontend import nn

        op, a = node.op, node.attrs
        if op == "input":
            name = str(a["name"])
            if name in ("kv_cache", "positions"):
                return None  # the cache object is passed to attention; positions come from it
            return self.feeds[name]
        if op == "param":
            return _ParamRef(str(a["name"]))
        if op == "rope":
            return _Rope(node)
        if op in ("attention", "rope_attention"):
            return self.attention(node)
        args = [self.env[id(v.node)][v.index] for v in node.inputs]
        for arg in args:
            if isinstance(arg, _Rope):
                raise UnsupportedError(f"{node} reads a rope result; the tvm target folds rope into attention only")
        if op == "embedding":
            return self.embedding(args[0], args[1], str(a["dtype"]))
        if op == "rms_norm":
            return self.rms_norm(args[0], args[1], float(a["eps"]))  # type: ignore[arg-type]
        if op == "add_rms_norm":
            total = args[0] + args[1]
            return self.rms_norm(total, args[2], float(a["eps"])), total  # type: ignore[arg-type]
        if op == "linear":
            return self.linear(args[0], args[1])
        if op == "split":
            sizes = [int(s) for s in a["sizes"]]  # type: ignore[union-attr]
            bounds = list(np.cumsum(sizes)[:-1].tolist())
            return tuple(nn.op.split(args[0], bounds, axis=1))
        if op == "split_heads":
            return nn.op.reshape(args[0], (args[0].shape[0], int(a["heads"]), int(a["head_dim"])))  # type: ignore[call-overload]
        if op == "merge_heads":
            x = args[0]
            return nn.op.reshape(x, (x.shape[0], int(x.shape[1]) * int(x.shape[2])))
        if op == "silu":
            return nn.op.silu(args[0])
        if op == "mul":
            return args[0] * args[1]
        if op == "add":
            return args[0] + args[1]
        if op == "swiglu":
            gate, up = nn.op.split(args[0], 2, axis=1)
            return nn.op.silu(gate) * up
        if op == "gather_rows":
            return nn.op.take(args[0], args[1], axis=0)
        raise UnsupportedError(f"the tvm target cannot lower op {op!r}")

    def _param(self, ref: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(ref, _ParamRef):
            raise UnsupportedError("weights must be module params for the tvm target")
        return ref.name, self.model.tensors[ref.name]

    def embedding(self, table_ref: Any, ids: Any, dtype: str) -> Any:
        from tvm.relax.frontend import nn

        from llmc.targets.tvm.quant import quantized_embedding

        name, parts = self._param(table_ref)
        info = self.model_info(name)
        if info.quant is not None:
            return quantized_embedding(ids, _ordered(parts), info.quant, tuple(info.type.shape), dtype)
        rows = nn.op.take(parts["weight"], ids, axis=0)
        return rows if rows.dtype == dtype else rows.astype(dtype)

    def model_info(self, name: str) -> Any:
        return self._module_params[name]

    @property
    def _module_params(self) -> dict[str, Any]:
        return self.model.module_params

    def rms_norm(self, x: Any, weight_ref: Any, eps: float) -> Any:
        from tvm.relax.frontend import nn

        _, parts = self._param(weight_ref)
        w = parts["weight"]
        if w.dtype != x.dtype:
            w = w.astype(x.dtype)
        return nn.op.rms_norm(x, w, axes=[-1], epsilon=eps)

    def linear(self, x: Any, weight_ref: Any) -> Any:
        from llmc.targets.tvm.quant import float_linear, quantized_linear

        name, parts = self._param(weight_ref)
        info = self.model_info(name)
        if info.quant is not None:
            return quantized_linear(x, _ordered(parts), info.quant, tuple(info.type.shape), name.replace(".", "_"),
                                    nibble_pairs=self.model.nibble_pairs)
        return float_linear(x, parts["weight"], name.replace(".", "_"))

    def attention(self, node: Node) -> Any:
        from tvm.relax.frontend import nn

        q_val, k_val, v_val, _ = _attention_operands(node, self.positions)
        q, k, v = self.get(q_val), self.get(k_val), self.get(v_val)
        if self.permute:
            q = nn.op.take(q, self.model.perm, axis=2)
            k = nn.op.take(k, self.model.perm, axis=2)
        tokens, n_q, head_dim = q.shape[0], int(q.shape[1]), int(q.shape[2])
        qkv = nn.op.concat([q, k, v], dim=1)
        qkv = nn.op.reshape(qkv, (1, tokens, int(qkv.shape[1]), head_dim))
        out = self.kv.attention_with_fused_qkv(int(node.attrs["layer"]), qkv, n_q,  # type: ignore[call-overload]
                                               sm_scale=float(node.attrs["scale"]))  # type: ignore[arg-type]
        return nn.op.reshape(out, (tokens, n_q, head_dim))


def _ordered(parts: dict[str, Any]) -> list[Any]:
    return [parts[p] for p in ("qdata", "scales", "offsets") if p in parts]
