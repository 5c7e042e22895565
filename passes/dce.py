"""Dead-code elimination: drop nodes nothing reads, and params no function references."""

from __future__ import annotations

from llmc.compiler.ir.graph import Function, Module
from llmc.compiler.ir.surgery import live_nodes
from llmc.passes.base import Pass, PassContext, PassResult
from llmc.passes.pipelines import register_pass


@register_pass
class DeadCodeElimination(Pass):
    name = "dce"
    doc = "remove nodes whose results are unused (side-effecting ops stay) and unreferenced params"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        functions = {}
        removed = 0
        for name, fn in module.functions.items():
            nodes = live_nodes(fn)
            removed += len(fn.nodes) - len(nodes)
            functions[name] = Function(fn.name, nodes, dict(fn.outputs)) if len(nodes) != len(fn.nodes) else fn
        out = Module(functions, dict(module.params), dict(module.config), dict(module.meta))
        used = out.referenced_params()
        dropped = [p for p in out.params if p not in used]
        for p in dropped:
            del out.params[p]
        return PassResult(out, bool(removed or dropped), {"nodes_removed": removed, "params_removed": len(dropped)})
