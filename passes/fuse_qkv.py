"""Fuse the Q, K and V projections (three linears of one input) into one linear + split."""

from __future__ import annotations

from collections.abc import Mapping

from llmc.compiler.ir.graph import Value
from llmc.passes.concat import concat_param, concat_problem
from llmc.passes.pattern import Match, op, param, var
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule

PARTS = ("q", "k", "v")


def _check(m: Match) -> str | None:
    return concat_problem([m.param_info("w" + p) for p in PARTS])


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    weight = concat_param(rb, [m.param_name("w" + p) for p in PARTS], "qkv")
    fused = rb.op("linear", m["x"], weight)
    sizes = tuple(int(m[p].type.shape[1]) for p in PARTS)
    split = rb.node("split", fused, sizes=sizes)
    return {p: split.out(i) for i, p in enumerate(PARTS)}


QKV_RULE = Rule(
    "qkv",
    tuple(op("linear", var("x"), param("w" + p), capture=p) for p in PARTS),
    _rewrite,
    _check,
    "three linears of one input -> one linear on row-concatenated weights, then split",
)


@register_pass
class FuseQKV(RulePass):
    name = "fuse-qkv"
    doc = "fuse the Q/K/V projections into one matmul (weights concatenated at compile time) + split"

    def rules(self) -> list[Rule]:
        return [QKV_RULE]
