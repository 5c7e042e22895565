"""Let attention read q, k and v packed in one tensor (``packed_rope_attention``).

After ``fuse-qkv`` and ``fold-rope`` a layer computes one ``[tokens, (hq + 2 hkv) * d]``
projection, splits it three ways, views each part as heads and hands them to
``rope_attention``. A kernel that takes the packed projection itself (ONNX Runtime's
``GroupQueryAttention``) needs none of the split and views: this pass replaces the five nodes by
``packed_rope_attention(qkv, positions, kv)``. Such a kernel applies RoPE itself only for some
sizes, so the pass packs only layers whose ``head_dim`` and rotary pair count (``rotary_dim / 2``)
are multiples of what the asking target gives (a target asks for it through
:meth:`Target.rewrites <llmc.runtime.target.Target.rewrites>`).
"""

from __future__ import annotations

from collections.abc import Mapping

from llmc.compiler.ir.graph import Value
from llmc.compiler.ir.rope import rope_attrs
from llmc.passes.pattern import Match, op, var
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule

PARTS = ("q", "k", "v")


def _views() -> tuple:
    return tuple(op("split_heads", op("split", var("x"), capture=f"split_{p}", result=i), capture=p)
                 for i, p in enumerate(PARTS))


PATTERN = op("rope_attention", *_views(), var("pos"), var("kv"), capture="attn")


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    attrs = m.node("attn").attrs
    new = rb.op("packed_rope_attention", m["x"], m["pos"], m["kv"], layer=attrs["layer"], scale=attrs["scale"],
                heads=m.attr("q", "heads"), kv_heads=m.attr("k", "heads"), head_dim=m.attr("q", "head_dim"),
                **rope_attrs(attrs))
    return {"attn": new}


@register_pass
class PackQKVAttention(RulePass):
    name = "pack-qkv-attention"
    doc = "let attention read the fused qkv projection unsplit (packed_rope_attention), where the kernel ropes it"
    produces = frozenset({"packed_rope_attention"})

    def __init__(self, head_dim_multiple: int = 1, rotary_pairs_multiple: int = 1) -> None:
        if int(head_dim_multiple) <= 0 or int(rotary_pairs_multiple) <= 0:
            raise ValueError("head_dim_multiple and rotary_pairs_multiple must be positive")
        self.head_dim_multiple = int(head_dim_multiple)
        self.rotary_pairs_multiple = int(rotary_pairs_multiple)

    def _check(self, m: Match) -> str | None:
        split = m.node("split_q")
        if m.node("split_k") is not split or m.node("split_v") is not split or len(split.out_types) != 3:
            return "q, k and v are not the three parts of one split"
        head_dim = int(m.attr("q", "head_dim"))
        if {int(m.attr(p, "head_dim")) for p in PARTS} != {head_dim}:
            return "q, k and v heads differ in size"
        if head_dim % self.head_dim_multiple or (int(m.attr("attn", "rotary_dim")) // 2) % self.rotary_pairs_multiple:
            return (f"the kernel applies rope itself only for head_dim % {self.head_dim_multiple} == 0 and "
                    f"rotary_dim / 2 % {self.rotary_pairs_multiple} == 0")
        return None

    def rules(self) -> list[Rule]:
        return [Rule.single("packed-qkv", PATTERN, _rewrite, self._check,
                            "rope_attention(split_heads(split(x)) x3) -> packed_rope_attention(x)")]
