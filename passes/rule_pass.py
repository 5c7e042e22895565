"""A pass made of declarative rewrite rules (every fusion is one)."""

from __future__ import annotations

from abc import abstractmethod

from llmc.compiler.ir.graph import Module
from llmc.passes.base import Pass, PassContext, PassResult
from llmc.passes.rule_engine import apply_rules
from llmc.passes.rules import Rule


class RulePass(Pass):
    """Applies :meth:`rules` with the rule engine; stats count matches and rejections."""

    @abstractmethod
    def rules(self) -> list[Rule]:
        """The rules of this pass, applied in order."""

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        out, stats = apply_rules(module, ctx, self.rules())
        return PassResult(out, stats.total_matches > 0, stats.as_stats(), dict(stats.rejections))
