"""The accuracy gate: a compiled model's quality, measured before anything is written.

The compile driver runs the pipeline with the ``quantize`` pass last, so fused weights are
quantized as one matrix; then, with ``--eval-file``, this gate scores the result against the
unquantized model (same IR, float weights; for ``--quant native`` the dequantized GGUF) through
the target registry (:data:`SCORING_TARGET`, an in-memory executor): perplexity, mean
KL(reference || quantized) and top-1 agreement go into the manifest's ``quality`` key. Over
``--max-ppl-increase`` the compile fails with :class:`QualityGateError` before anything is
written, unless ``--auto-escalate``: then the sensitivity of every unit (``embed``, ``lm_head``,
each ``layers.N``) is *measured* as the KL of the model with only that unit quantized, and the
most sensitive units are raised one precision step (int4 -> int8 -> fp16 -> fp32) one at a time
until the budget holds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.errors import LlmcError, QualityGateError
from llmc.compiler.ir.graph import Module, ParamInfo
from llmc.compiler.ir.surgery import retype_params
from llmc.compiler.ir.types import TensorType
from llmc.compiler.token_ids import read_tokens
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore, as_float, dtype_name
from llmc.passes.quant_plan import Scheme, parse_scheme
from llmc.passes.quantize import QuantizePass, quantize_weight
from llmc.runtime.evaluate import EvalResult, evaluate, reference_logits
from llmc.runtime.executor import Executor
from llmc.runtime.registry import get_target

log = logging.getLogger(__name__)

SCORING_TARGET = "torch"
"""The target whose in-memory executor scores candidates (float32 on the CPU)."""
ESCALATION = {4: "int8", 8: "fp16", "float16": "none", "bfloat16": "none"}


def parse_budget(value: str | float | None) -> float | None:
    """``"10%"`` -> 0.10, ``"0.1"`` -> 0.1; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        budget = float(value)
    else:
        text = value.strip()
        try:
            budget = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError as exc:
            raise LlmcError(f"--max-ppl-increase must be like 10% or 0.1, not {value!r}") from exc
    if budget < 0:
        raise LlmcError(f"--max-ppl-increase must not be negative, got {value!r}")
    return budget


def unit_of(name: str) -> str:
    """The escalation unit of a param: ``layers.N`` for layer params, else the name itself."""
    match = re.match(r"^(layers\.\d+)\.", name)
    return match.group(1) if match else name


def escalated(scheme: Scheme) -> Scheme | None:
    """One precision step up, or None at float32."""
    key: Any = scheme.bits if scheme.bits is not None else scheme.dtype
    nxt = ESCALATION.get(key)
    return None if nxt is None else parse_scheme(nxt)


def module_for(module: Module, weights: Mapping[str, Weight]) -> Module:
    """``module`` with params retyped to the given weights (quant specs and dtypes)."""
    params = dict(module.params)
    for name in module.referenced_params():
        w = weights[name]
        info = params[name]
        if isinstance(w, QuantizedTensor):
            params[name] = ParamInfo(name, TensorType(info.type.shape, "float32"), w.spec)
        else:
            params[name] = ParamInfo(name, TensorType(info.type.shape, dtype_name(np.asarray(w).dtype)), None)
    return retype_params(module, params)


@dataclass
class GateOutcome:
    """What the gate adds to the compile: the module (retyped if layers were escalated), the
    manifest's ``quality`` record and the lines to print."""

    module: Module
    quality: dict[str, Any] = field(default_factory=dict)
    escalated: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


class _Scorer:
    """Scores weight sets of one module against cached reference logits on the scoring target."""

    def __init__(self, module: Module, ref_weights: Mapping[str, Weight], ids: list[int]) -> None:
        self.module = module
        self.ids = ids
        self.target = get_target(SCORING_TARGET)
        ref_exec = self._executor(ref_weights)
        self.ref_logits = reference_logits(ref_exec, ids)
        self.reference = evaluate(ref_exec, ids)

    def _executor(self, weights: Mapping[str, Weight]) -> Executor:
        try:
            return self.target.load_module(module_for(self.module, weights), weights)  # type: ignore[arg-type]
        except LlmcError as exc:
            raise LlmcError(f"the accuracy gate runs the IR on the {SCORING_TARGET} target, which failed: {exc}") \
                from exc

    def score(self, weights: Mapping[str, Weight]) -> EvalResult:
        return evaluate(self._executor(weights), self.ids, reference=self.ref_logits)

    def increase(self, result: EvalResult) -> float:
        return result.perplexity / self.reference.perplexity - 1.0


@dataclass
class AccuracyGate:
    """``--eval-file`` (and its budget): built from the options before any slow work, so a bad
    budget or an unreadable file fails at once; :meth:`run` scores the compiled module."""

    eval_file: Path
    ids: list[int]
    budget: float | None
    auto_escalate: bool

    @classmethod
    def from_options(cls, eval_file: Path | None, max_ppl_increase: str | float | None, auto_escalate: bool,
                     tokenizer: LlmcTokenizer | None) -> AccuracyGate | None:
        """The gate the options ask for, or None without ``--eval-file``."""
        budget = parse_budget(max_ppl_increase)
        if eval_file is None:
            if budget is not None or auto_escalate:
                raise LlmcError("--max-ppl-increase and --auto-escalate need --eval-file (the held-out text to score)")
            return None
        return cls(Path(eval_file), read_tokens(eval_file, tokenizer, "eval file"), budget, auto_escalate)

    def run(self, module: Module, weights: WeightStore, reference: Mapping[str, Weight],
            qpass: QuantizePass | None) -> GateOutcome:
        """Score ``module`` with ``weights`` against the same module with ``reference`` weights (the
        matrices before quantization); escalate or raise :class:`QualityGateError` over budget."""
        used = sorted(module.referenced_params())
        matrices = [n for n in used if module.params[n].type.rank == 2]
        ref_weights = {n: reference.get(n, weights[n]) for n in used}
        outcome = GateOutcome(module)
        _gate(outcome, module, weights, ref_weights, matrices, qpass, self, self.ids, self.budget)
        return outcome


def _gate(outcome: GateOutcome, module: Module, weights: WeightStore, ref_weights: dict[str, Weight],
          matrices: list[str], qpass: QuantizePass | None, gate: AccuracyGate, ids: list[int],
          budget: float | None) -> None:
    # The float model the quantized one is measured against (AWQ-scaled floats are the same function).
    float_ref = {n: (as_float(w) if isinstance(w, QuantizedTensor) else w) for n, w in ref_weights.items()}
    scorer = _Scorer(module, float_ref, ids)
    final = {n: weights[n] for n in ref_weights}
    result = scorer.score(final)
    increase = scorer.increase(result)
    quality: dict[str, Any] = {
        "eval_file": str(gate.eval_file),
        "tokens": result.tokens,
        "executor": "torch/cpu float32",
        "reference": {"perplexity": scorer.reference.perplexity, "mean_nll": scorer.reference.mean_nll},
        "quantized": result.to_dict(),
        "ppl_increase": increase,
        "max_ppl_increase": budget,
    }
    outcome.quality = quality
    fits = budget is None or increase <= budget
    if not fits and gate.auto_escalate:
        result, increase, fits = _escalate(outcome, module, weights, float_ref, matrices, qpass, scorer, budget,
                                           result, increase)
        quality["quantized"] = result.to_dict()
        quality["ppl_increase"] = increase
    quality["passed"] = fits
    if not fits:
        raise QualityGateError(
            f"accuracy gate failed: perplexity {result.perplexity:.4f} vs {scorer.reference.perplexity:.4f} "
            f"unquantized (+{increase:.2%}) exceeds --max-ppl-increase {budget:.2%} on {result.tokens} tokens of "
            f"{gate.eval_file}; KL {result.kl_mean:.4g}, top-1 agreement {result.top1_agreement:.1%}; "
            "no artifact written",
            hint="raise the budget, use --auto-escalate, a larger --quant precision or --calib-file",
        )
    outcome.messages.append(
        f"quality: ppl {result.perplexity:.4f} vs {scorer.reference.perplexity:.4f} (+{increase:.2%}), "
        f"KL {result.kl_mean:.4g}, top-1 {result.top1_agreement:.1%} on {result.tokens} tokens"
        + ("" if budget is None else f" (budget {budget:.2%})")
    )


def _escalate(outcome: GateOutcome, module: Module, weights: WeightStore, float_ref: dict[str, Weight],
              matrices: list[str], qpass: QuantizePass | None, scorer: _Scorer, budget: float | None,
              result: EvalResult, increase: float) -> tuple[EvalResult, float, bool]:
    """Raise the most sensitive units one precision step at a time until the budget holds."""
    assert budget is not None
    # Floats the quantized weights were made from (after AWQ scaling; the same function as the reference).
    base = dict(float_ref)
    if qpass is not None:
        base.update(qpass.float_weights)
    quantized = {n: weights[n] for n in float_ref}
    units: dict[str, list[str]] = {}
    for name in matrices:
        units.setdefault(unit_of(name), []).append(name)
    sensitivity: dict[str, float] = {}
    for unit, names in units.items():
        mix = dict(base)
        mix.update({n: quantized[n] for n in names})
        sensitivity[unit] = float(scorer.score(mix).kl_mean or 0.0)
    order = sorted(units, key=lambda u: -sensitivity[u])
    current = dict(quantized)
    steps: list[dict[str, Any]] = []
    escalated_units: list[str] = []
    fits = False
    queue = list(order)  # most sensitive first; a unit comes back for its next step after a full round
    while queue and not fits:
        unit = queue.pop(0)
        ups = {n: escalated(scheme_of(current[n])) for n in units[unit]}
        if all(up is None for up in ups.values()):
            continue
        for name, up in ups.items():
            if up is not None:
                current[name], _ = quantize_weight(base[name], up)
        queue.append(unit)
        if unit not in escalated_units:
            escalated_units.append(unit)
        result = scorer.score(current)
        increase = scorer.increase(result)
        precision = sorted({describe_weights(current, [n])[n] for n in units[unit]})
        steps.append({"unit": unit, "to": precision, "sensitivity_kl": sensitivity[unit], "ppl_increase": increase})
        outcome.messages.append(f"escalated {unit} to {'/'.join(precision)} (measured KL {sensitivity[unit]:.4g}): "
                                f"ppl +{increase:.2%}")
        fits = increase <= budget
    for name, value in current.items():
        weights[name] = value
    outcome.module = module_for(outcome.module, current)
    outcome.quality["escalation"] = {
        "method": "greedy by measured per-unit KL (one unit quantized at a time)",
        "sensitivity_kl": sensitivity,
        "escalated": escalated_units,
        "steps": steps,
    }
    outcome.escalated = escalated_units
    return result, increase, fits


def scheme_of(weight: Weight) -> Scheme:
    """The scheme a weight is stored in."""
    if isinstance(weight, QuantizedTensor):
        return Scheme(bits=weight.spec.bits, group=weight.spec.group_size, symmetric=weight.spec.symmetric)
    dtype = dtype_name(np.asarray(weight).dtype)
    return Scheme(dtype=dtype if dtype != "float64" else "float32")


def describe_weights(weights: Mapping[str, Weight], names: list[str]) -> dict[str, str]:
    """Param name -> ``int4g32a`` style spec or float dtype name."""
    out: dict[str, str] = {}
    for name in names:
        w = weights[name]
        out[name] = w.spec.describe() if isinstance(w, QuantizedTensor) else dtype_name(np.asarray(w).dtype)
    return out
