"""The ``nn.Module`` a module is exported through: its packed params, the paged KV cache
constructor and one method per exported function (``prefill``, ``decode``, ``decode_1``).

Each method hands its IR function to a function lowering (:mod:`llmc.targets.tvm.lower`),
which emits the function's nodes as ``nn`` ops inside ``export_tvm``'s tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmc.compiler.ir.graph import Function, Module, ParamInfo
from llmc.compiler.packing import TensorPart, layout_for
from llmc.targets.tvm.rope import RopePlan, interleaved_to_half

DECODE_ONE = "decode_1"
"""``decode`` specialised to one sequence: static shapes, so schedules (dlight GEMV) and
meta-schedule tuning apply to its matrix-vector products."""

RunFunction = Callable[[Any, Function, dict[str, Any], Any, bool], Any]
"""``run(model, fn, feeds, kv_cache, permute_qk) -> logits``: lowers one IR function while tracing."""


def param_parts(info: ParamInfo) -> list[TensorPart]:
    """The tensors a param is passed to the VM as: the float weight, or the parts of llmc's packed layout."""
    shape = tuple(int(d) for d in info.type.shape)
    if info.quant is None:
        return [TensorPart("weight", shape, info.type.dtype)]
    return list(layout_for(info.quant, (shape[0], shape[1])).parts())


def activation_dtype(module: Module) -> str:
    for fn in module:
        for node in fn.nodes:
            if node.op == "embedding":
                return str(node.attrs["dtype"])
    return "float32"


def build_model_class(module: Module, plan: RopePlan, target: Any, run: RunFunction) -> type:
    """An ``nn.Module`` class whose methods run the IR functions of ``module`` through ``run``."""
    from tvm import relax
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import RopeMode, TIRPagedKVCache

    config = module.config
    n_layers, n_q, n_kv = int(config["num_layers"]), int(config["num_heads"]), int(config["num_kv_heads"])
    head_dim = int(config["head_dim"])
    used = sorted(module.referenced_params())
    kv_dtype = activation_dtype(module)
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
                for part in param_parts(module.params[name]):
                    key = f"p{index}_{part.name}"
                    self.weights[key] = nn.Parameter(part.shape, part.dtype)
                    self.slot_of[key] = (name, part.name)
                    parts[part.name] = self.weights[key]
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
            logits = run(self, module.functions[fn_name], feeds, kv, perm is not None)
            return logits, kv

    # the weights dict is registered under this attribute name
    LlmcModel.__name__ = "LlmcModel"
    return LlmcModel
