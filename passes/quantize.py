"""The ``quantize`` pass: weight-only precision of every matrix param, per a :class:`QuantPlan`.

``quantize(int4, group=32, sym=false)``, ``quantize(int8)``, ``quantize(fp16)``, ... The
IR ops stay ``linear``/``embedding``; the pass replaces the values in ``ctx.weights`` (float
casts, or :class:`QuantizedTensor` from round-to-nearest) and the params' :class:`ParamInfo`
(quant spec; dtype for float casts, retyping the ``param`` nodes). With calibration tokens,
4-bit weights first get AWQ-style activation-aware scales (see :mod:`llmc.passes.awq`).

The compile driver appends this pass to the pipeline, *last*, after the fusions, so fused weights (e.g. a concatenated
qkv) are quantized as one matrix and AWQ's scale sharing follows the fused graph.
Norm vectors (1-D params) are never quantized.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.graph import Module, ParamInfo
from llmc.compiler.ir.surgery import retype_params
from llmc.compiler.ir.types import TensorType
from llmc.compiler.progress import step
from llmc.compiler.token_ids import read_token_ids
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, as_float
from llmc.passes.base import Pass, PassContext, PassResult
from llmc.passes.pipelines import register_pass
from llmc.passes.quant_plan import QuantPlan, Scheme
from llmc.passes.quant_rtn import fake_quantize, quantize_rtn

log = logging.getLogger(__name__)


def quantize_weight(weight: Any, scheme: Scheme, scale_dtype: str = "float16") -> tuple[Any, str]:
    """The weight under ``scheme`` (a float array or a :class:`QuantizedTensor`) and its description."""
    w = as_float(weight, np.float32)
    if scheme.dtype is not None:
        return w.astype(NUMPY_DTYPES[scheme.dtype]), scheme.dtype
    spec = scheme.spec_for(w.shape[1], scale_dtype)
    if spec.bits == 4 and w.shape[1] % 2:
        raise LlmcError(f"cannot pack a 4-bit weight with an odd input dim {w.shape[1]}; use int8 for it")
    return quantize_rtn(w, spec), spec.describe()


@register_pass
class QuantizePass(Pass):
    """Weight-only quantization (or float cast) of every matrix param."""

    name = "quantize"
    doc = "weight-only quantization: fp16/bf16 casts, int8 per channel, int4 group-wise (AWQ with calibration)"

    def __init__(self, scheme: str = "int4", group: int = 32, sym: bool | None = None, head: str | None = None,
                 override: str | list[str] | None = None, calib: str | None = None,
                 calib_ids: list[int] | None = None, awq_grid: int = 10, scale_dtype: str = "float16",
                 plan: QuantPlan | None = None, calib_tokens: int = 1024, keep_inputs: bool = False) -> None:
        self.plan = plan or QuantPlan.build(str(scheme), int(group), sym, head, override)
        ids = calib_ids if calib_ids is not None else (read_token_ids(calib, "calibration file") if calib else None)
        self.calib_ids = None if ids is None else ids[: int(calib_tokens)]
        self.awq_grid = int(awq_grid)
        self.scale_dtype = scale_dtype
        self.assignments: dict[str, str] = {}
        self.keep_inputs = keep_inputs
        self.input_weights: dict[str, Any] = {}
        """With ``keep_inputs``: every referenced param as the pass received it (before AWQ scaling,
        which also rescales norm vectors), by name, for the accuracy gate's reference (else nothing
        is kept: the matrices may be large)."""
        self.float_weights: dict[str, np.ndarray] = {}
        """With ``keep_inputs``: the float weights the quantized ones were made from (after AWQ
        scaling), by name (the gate's escalation re-quantizes them)."""
        self.awq_stats: dict[str, int] = {}

    def describe(self) -> str:
        extra = f",calib={len(self.calib_ids)} tokens" if self.calib_ids else ""
        return f"quantize({self.plan.main.describe()}{extra})"

    def _fake(self, name: str, w: np.ndarray) -> np.ndarray:
        scheme = self.plan.scheme_for(name)
        if scheme.dtype is not None:
            return w.astype(NUMPY_DTYPES[scheme.dtype]).astype(np.float32)
        return fake_quantize(w, scheme.spec_for(w.shape[1], self.scale_dtype))

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        used = module.referenced_params()
        matrices = [name for name, info in module.params.items() if info.type.rank == 2 and name in used]
        stats: dict[str, int] = {}
        if self.keep_inputs:
            self.input_weights = {name: ctx.weights[name] for name in sorted(used)}
        if self.calib_ids:
            def wants(name: str) -> bool:
                return self.plan.scheme_for(name).bits == 4

            self.awq_stats = _awq(module, ctx, self.calib_ids, self._fake, wants, self.awq_grid)
            stats.update(self.awq_stats)
        params = dict(module.params)
        bytes_before = bytes_after = 0
        with step("quantizing", total=len(matrices)) as progress:
            for name in matrices:
                weight = ctx.weights[name]
                bytes_before += _nbytes(weight)
                if self.keep_inputs:
                    self.float_weights[name] = as_float(weight) if isinstance(weight, QuantizedTensor) else weight
                scheme = self.plan.scheme_for(name)
                value, desc = quantize_weight(weight, scheme, self.scale_dtype)
                info = params[name]
                if isinstance(value, QuantizedTensor):
                    params[name] = ParamInfo(name, TensorType(info.type.shape, "float32"), value.spec)
                else:
                    params[name] = ParamInfo(name, TensorType(info.type.shape, scheme.dtype or "float32"), None)
                ctx.weights[name] = value
                bytes_after += _nbytes(value)
                self.assignments[name] = desc
                key = "params_" + scheme.describe()
                stats[key] = stats.get(key, 0) + 1
                progress.advance(name)
        stats["bytes_before"] = bytes_before
        stats["bytes_after"] = bytes_after
        return PassResult(retype_params(module, params), bool(matrices), stats)


def _awq(module: Module, ctx: PassContext, ids: list[int], fake: Any, wants: Any, grid: int) -> dict[str, int]:
    from llmc.passes.awq import apply_awq

    return apply_awq(module, ctx.weights, ids, fake, wants, grid)


def _nbytes(weight: Any) -> int:
    if isinstance(weight, QuantizedTensor):
        return weight.nbytes
    return int(np.asarray(weight).nbytes)
