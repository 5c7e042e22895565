"""Common-subexpression elimination: one node per (op, operands, attributes)."""

from __future__ import annotations

import json

from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.ops import OPS
from llmc.compiler.ir.surgery import rebuild_nodes
from llmc.passes.base import Pass, PassContext, PassResult
from llmc.passes.pipelines import register_pass


def _key(node: Node, canon: dict[Value, Value]) -> tuple | None:
    if node.op == "input" or OPS[node.op].side_effect:
        return None  # inputs are the signature; side effects must happen once per node
    operands = tuple((id(canon.get(v, v).node), v.index) for v in node.inputs)
    return node.op, operands, json.dumps(node.attrs, sort_keys=True), node.out_types


def cse_function(fn: Function) -> tuple[Function, int]:
    seen: dict[tuple, Node] = {}
    remap: dict[Value, Value] = {}
    kept: list[Node] = []
    for node in fn.nodes:
        key = _key(node, remap)
        if key is not None and key in seen:
            twin = seen[key]
            for i in range(len(node.out_types)):
                remap[Value(node, i)] = Value(twin, i)
            continue
        if key is not None:
            seen[key] = node
        kept.append(node)
    if not remap:
        return fn, 0
    nodes, outputs = rebuild_nodes(kept, remap, fn.outputs, "cse")
    return Function(fn.name, nodes, outputs), len(fn.nodes) - len(kept)


@register_pass
class CommonSubexpressionElimination(Pass):
    name = "cse"
    doc = "merge nodes computing the same op on the same operands (never side-effecting ops)"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        functions = {}
        merged = 0
        for name, fn in module.functions.items():
            functions[name], n = cse_function(fn)
            merged += n
        out = Module(functions, dict(module.params), dict(module.config), dict(module.meta))
        return PassResult(out, merged > 0, {"nodes_merged": merged})
