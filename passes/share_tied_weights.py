"""Point the tied LM head at the embedding table so the artifact stores it once."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from llmc.compiler.ir.graph import Module, Value
from llmc.compiler.weights import QuantizedTensor, Weight
from llmc.passes.base import PassContext, PassResult
from llmc.passes.pattern import Match, param
from llmc.passes.pipelines import register_pass
from llmc.passes.rule_pass import RulePass
from llmc.passes.rules import RewriteBuilder, Rule

EMBED, HEAD = "embed", "lm_head"


def same_weight(a: Weight, b: Weight) -> bool:
    """True when two weights hold the same values (and quantization)."""
    if a is b:
        return True
    if isinstance(a, QuantizedTensor) or isinstance(b, QuantizedTensor):
        if not (isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)):
            return False
        if a.spec != b.spec or a.shape != b.shape or (a.offsets is None) != (b.offsets is None):
            return False
        pairs = [(a.qdata, b.qdata), (a.scales, b.scales)]
        if a.offsets is not None and b.offsets is not None:
            pairs.append((a.offsets, b.offsets))
        return all(np.array_equal(x, y) for x, y in pairs)
    x, y = np.asarray(a), np.asarray(b)
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def _check(m: Match) -> str | None:
    if not m.module.config.get("tie_word_embeddings"):
        return "the config does not tie the head to the embedding"
    if EMBED not in m.module.params:
        return "the module has no embedding param"
    head, embed = m.module.params[HEAD], m.module.params[EMBED]
    if (head.type, head.quant) != (embed.type, embed.quant):
        return "lm_head and embed differ in type or quantization"
    if not same_weight(m.ctx.weights[HEAD], m.ctx.weights[EMBED]):
        return "lm_head weights differ from the embedding"
    return None


def _rewrite(m: Match, rb: RewriteBuilder) -> Mapping[str, Value]:
    return {"head": rb.param(EMBED)}


SHARE_TIED_RULE = Rule.single("tied-head", param("head", name=HEAD), _rewrite, _check,
                              "param lm_head -> param embed when tied and equal")


@register_pass
class ShareTiedWeights(RulePass):
    name = "share-tied-weights"
    doc = "read the tied lm_head from the embedding param and drop the duplicate"

    def rules(self) -> list[Rule]:
        return [SHARE_TIED_RULE]

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        result = super().run(module, ctx)
        out = result.module
        if HEAD in out.params and HEAD not in out.referenced_params():
            del out.params[HEAD]
            result.stats["params_removed"] = 1
        return result
