"""One graph builder for every Llama-family front end.

Front ends map their tensor names to the canonical names below and hand over a
:class:`WeightStore`; this module declares the params and builds the ``prefill`` and
``decode`` functions. Both take flattened tokens of a batch of sequences (``input_ids`` and
``positions`` of shape ``[tokens]``) and the kv cache; ``prefill`` returns logits only for
the rows in ``logits_index``, ``decode`` (one token per sequence) for every row.
"""

from __future__ import annotations

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import InputError
from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import AttrValue, Function, Module, ParamInfo, Value
from llmc.compiler.ir.types import KV_CACHE_TYPE, TensorType
from llmc.compiler.weights import QuantizedTensor, WeightStore, dtype_name

PREFILL, DECODE = "prefill", "decode"
LAYER_PARAMS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical param name -> expected logical shape."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attn_norm": (h,),
            p + "q": (config.num_heads * d, h),
            p + "k": (config.num_kv_heads * d, h),
            p + "v": (config.num_kv_heads * d, h),
            p + "o": (h, config.num_heads * d),
            p + "mlp_norm": (h,),
            p + "gate": (f, h),
            p + "up": (f, h),
            p + "down": (h, f),
        }
    shapes["final_norm"] = (h,)
    shapes["lm_head"] = (config.vocab_size, h)
    return shapes


def declare_params(config: ModelConfig, weights: WeightStore, source: str) -> dict[str, ParamInfo]:
    """ParamInfo for every canonical weight, checking presence and shape against the config."""
    params: dict[str, ParamInfo] = {}
    for name, shape in param_shapes(config).items():
        if name not in weights:
            raise InputError(f"{source}: missing weight for {name!r}")
        weight = weights[name]
        if isinstance(weight, QuantizedTensor):
            got, dtype, quant = weight.shape, "float32", weight.spec
        else:
            got, dtype, quant = tuple(weight.shape), dtype_name(np.asarray(weight).dtype), None
        if tuple(got) != shape:
            raise InputError(
                f"{source}: weight {name!r} has shape {list(got)}, expected {list(shape)} from the config"
            )
        params[name] = ParamInfo(name, TensorType(shape, dtype), quant)
    return params


def rope_attrs(config: ModelConfig) -> dict[str, AttrValue]:
    attrs: dict[str, AttrValue] = {
        "theta": float(config.rope_theta),
        "style": config.rope_style,
        "rotary_dim": int(config.rotary_dim),
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        attrs |= {
            "scaling": "llama3",
            "factor": float(s.factor),
            "low_freq_factor": float(s.low_freq_factor),
            "high_freq_factor": float(s.high_freq_factor),
            "original_max_position": int(s.original_max_position),
        }
    return attrs


def build_module(
    config: ModelConfig,
    params: dict[str, ParamInfo],
    activation_dtype: str = "float32",
    meta: dict[str, str] | None = None,
) -> Module:
    """The unoptimized Llama module (what ``--opt-level 0`` compiles)."""
    functions = {
        name: _build_function(name, config, params, activation_dtype) for name in (PREFILL, DECODE)
    }
    return Module(functions, dict(params), config.to_dict(), dict(meta or {}))


def _build_function(
    name: str, config: ModelConfig, params: dict[str, ParamInfo], act: str
) -> Function:
    b = Builder(params)
    tokens = "tokens" if name == PREFILL else "batch"
    ids = b.input("input_ids", TensorType((tokens,), "int64"))
    pos = b.input("positions", TensorType((tokens,), "int64"))
    index = b.input("logits_index", TensorType(("outputs",), "int64")) if name == PREFILL else None
    kv = b.input("kv_cache", KV_CACHE_TYPE)
    rope = rope_attrs(config)
    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    eps = float(config.rms_norm_eps)

    x = b.op("embedding", b.param("embed"), ids, dtype=act)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        h = b.op("rms_norm", x, b.param(p + "attn_norm"), eps=eps)
        q = b.op("split_heads", b.op("linear", h, b.param(p + "q")), heads=hq, head_dim=d)
        k = b.op("split_heads", b.op("linear", h, b.param(p + "k")), heads=hkv, head_dim=d)
        v = b.op("split_heads", b.op("linear", h, b.param(p + "v")), heads=hkv, head_dim=d)
        q = b.op("rope", q, pos, **rope)
        k = b.op("rope", k, pos, **rope)
        a = b.op("attention", q, k, v, kv, layer=i, scale=float(d) ** -0.5)
        x = b.op("add", x, b.op("linear", b.op("merge_heads", a), b.param(p + "o")))
        h = b.op("rms_norm", x, b.param(p + "mlp_norm"), eps=eps)
        gate = b.op("silu", b.op("linear", h, b.param(p + "gate")))
        up = b.op("linear", h, b.param(p + "up"))
        x = b.op("add", x, b.op("linear", b.op("mul", gate, up), b.param(p + "down")))
    x = b.op("rms_norm", x, b.param("final_norm"), eps=eps)
    if index is not None:
        x = b.op("gather_rows", x, index)
    logits: Value = b.op("linear", x, b.param("lm_head"))
    return b.function(name, {"logits": logits})
