"""Fold the RoPE of q and k into the attention op (``rope_attention``)."""

from __future__ import annotations

from collections.abc import Mapping

from llmc.compiler.ir.graph import Value
from llmc.compiler.ir.rope import RopeSpec, rope_attrs
from llmc.passes.pattern import Match, op, var
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule


def _check(m: Match) -> str | None:
    if RopeSpec.from_attrs(m.node("rq").attrs) != RopeSpec.from_attrs(m.node("rk").attrs):
        return "q and k use different rope settings"
    return None


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    attn = m.node("attn").attrs
    new = rb.op("rope_attention", m["q"], m["k"], m["v"], m["pos"], m["kv"],
                layer=attn["layer"], scale=attn["scale"], **rope_attrs(m.node("rq").attrs))
    return {"attn": new}


FOLD_ROPE_RULE = Rule.single(
    "rope-attention",
    op("attention",
       op("rope", var("q"), var("pos"), capture="rq"),
       op("rope", var("k"), var("pos"), capture="rk"),
       var("v"), var("kv"), capture="attn"),
    _rewrite,
    _check,
    "attention(rope(q, pos), rope(k, pos), v, kv) -> rope_attention(q, k, v, pos, kv)",
)


@register_pass
class FoldRope(RulePass):
    name = "fold-rope"
    doc = "fold the rope of q and k into the attention op (rope_attention)"
    produces = frozenset({"rope_attention"})

    def rules(self) -> list[Rule]:
        return [FOLD_ROPE_RULE]
