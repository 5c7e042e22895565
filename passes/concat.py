"""Compile-time concatenation of ``[out, in]`` weights along their output rows.

Used by the projection fusions: the fused weight is a new param whose rows are the rows of
its parts in order. Plain arrays must share dtype and input width; quantized weights must
share their :class:`QuantSpec` (then rows, scales and offsets concatenate exactly, since
quantization groups run along the input dim; GGUF blocks likewise, row by row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmc.compiler.ir.graph import ParamInfo, Value
from llmc.compiler.ir.types import TensorType
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore
from llmc.passes.rules import RewriteBuilder


def concat_problem(infos: Sequence[ParamInfo]) -> str | None:
    """Why these params cannot be concatenated along rows (None when they can)."""
    first = infos[0]
    for info in infos:
        if info.type.rank != 2:
            return f"weight {info.name} is not 2-D"
        if info.type.shape[1] != first.type.shape[1]:
            return "weights differ in input width"
        if info.quant != first.quant:
            return "weights are quantized differently"
        if info.type.dtype != first.type.dtype:
            return "weights differ in dtype"
        if not isinstance(info.type.shape[0], int):
            return f"weight {info.name} has a symbolic row count"
    return None


def concat_rows(parts: Sequence[Weight]) -> Weight:
    """The row-wise concatenation of ``parts`` (all plain, or all quantized with one spec)."""
    if all(isinstance(p, QuantizedTensor) for p in parts):
        qts: list[QuantizedTensor] = list(parts)  # type: ignore[arg-type]
        spec, inp = qts[0].spec, qts[0].shape[1]
        if any(q.spec != spec or q.shape[1] != inp for q in qts):
            raise ValueError("quantized weights differ in spec or input width")
        offsets = None if qts[0].offsets is None else np.concatenate([q.offsets for q in qts])  # type: ignore[misc]
        return QuantizedTensor(
            spec,
            (sum(q.shape[0] for q in qts), inp),
            np.concatenate([q.qdata for q in qts]),
            np.concatenate([q.scales for q in qts]),
            offsets,
        )
    if any(isinstance(p, QuantizedTensor) for p in parts):
        raise ValueError("cannot concatenate quantized with plain weights")
    arrays = [np.asarray(p) for p in parts]
    if len({a.dtype for a in arrays}) != 1 or len({a.shape[1] for a in arrays}) != 1:
        raise ValueError("weights differ in dtype or input width")
    return np.concatenate(arrays, axis=0)


def fused_name(names: Sequence[str], suffix: str) -> str:
    """``layers.0.q, layers.0.k, layers.0.v`` + ``qkv`` -> ``layers.0.qkv``."""
    split = [name.split(".") for name in names]
    common: list[str] = []
    for parts in zip(*(s[:-1] for s in split), strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join([*common, suffix])


def concat_param(rb: RewriteBuilder, names: Sequence[str], suffix: str) -> Value:
    """A param node for the concatenation of params ``names`` (created once per module:
    both functions of a module share it). The weight is concatenated lazily, when read."""
    derived = rb.ctx.derived_params
    base = fused_name(names, suffix)
    candidate, n = base, 1
    while rb.has_param(candidate):
        if derived.get(candidate) == tuple(names):
            return rb.param(candidate)
        candidate, n = f"{base}.{n}", n + 1
    infos = [rb.param_info(name) for name in names]
    rows = sum(int(i.type.shape[0]) for i in infos)
    info = ParamInfo(candidate, TensorType((rows, infos[0].type.shape[1]), infos[0].type.dtype), infos[0].quant)
    weights: WeightStore = rb.ctx.weights
    value = rb.add_param(info, lambda: concat_rows([weights[name] for name in names]))
    derived[candidate] = tuple(names)
    return value
