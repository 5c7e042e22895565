"""Fuse a residual ``add`` with the ``rms_norm`` of its sum into ``add_rms_norm``."""

from __future__ import annotations

from collections.abc import Mapping

from llmc.compiler.ir.graph import Value
from llmc.passes.pattern import Match, op, var
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    fused = rb.node("add_rms_norm", m["a"], m["b"], m["w"], eps=m.attr("norm", "eps"))
    # the sum usually feeds the next residual add too: both old results are replaced
    return {"norm": fused.out(0), "sum": fused.out(1)}


ADD_RMSNORM_RULE = Rule.single(
    "add-rmsnorm",
    op("rms_norm", op("add", var("a"), var("b"), capture="sum"), var("w"), capture="norm"),
    _rewrite,
    None,
    "rms_norm(a + b, w) -> add_rms_norm(a, b, w) returning (normalized, sum)",
)


@register_pass
class FuseAddRMSNorm(RulePass):
    name = "fuse-add-rmsnorm"
    doc = "fuse a residual add and the rms_norm of its sum into add_rms_norm -> (normed, sum)"
    produces = frozenset({"add_rms_norm"})

    def rules(self) -> list[Rule]:
        return [ADD_RMSNORM_RULE]
