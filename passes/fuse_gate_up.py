"""Fuse the gate and up projections and the SwiGLU activation: one linear + ``swiglu``."""

from __future__ import annotations

from collections.abc import Mapping

from llmc.compiler.ir.graph import Value
from llmc.passes.concat import concat_param, concat_problem
from llmc.passes.pattern import Match, op, param, var
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule


def _check(m: Match) -> str | None:
    return concat_problem([m.param_info("wg"), m.param_info("wu")])


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    weight = concat_param(rb, [m.param_name("wg"), m.param_name("wu")], "gate_up")
    return {"out": rb.op("swiglu", rb.op("linear", m["x"], weight))}


GATE_UP_RULE = Rule.single(
    "gate-up",
    op("mul",
       op("silu", op("linear", var("x"), param("wg"))),
       op("linear", var("x"), param("wu")),
       capture="out"),
    _rewrite,
    _check,
    "silu(x @ Wg.T) * (x @ Wu.T) -> swiglu(x @ [Wg; Wu].T)",
)


@register_pass
class FuseGateUp(RulePass):
    name = "fuse-gate-up"
    doc = "fuse the gate/up projections into one matmul on concatenated weights + the swiglu op"
    produces = frozenset({"swiglu"})

    def rules(self) -> list[Rule]:
        return [GATE_UP_RULE]
