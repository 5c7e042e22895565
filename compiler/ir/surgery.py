"""Graph surgery shared by passes: rebuilding functions with some nodes replaced.

Nodes are immutable; every edit builds new nodes for what changed and for everything that
reads a changed value, keeping the rest shared.
"""

from __future__ import annotations

from llmc.compiler.ir.graph import Function, Module, Node, ParamInfo, Value


def retype_params(module: Module, params: dict[str, ParamInfo]) -> Module:
    """A module with ``params`` declared and every ``param`` node typed accordingly."""
    functions = {name: _retype_function(fn, params) for name, fn in module.functions.items()}
    return Module(functions, params, dict(module.config), dict(module.meta))


def _retype_function(fn: Function, params: dict[str, ParamInfo]) -> Function:
    mapping: dict[int, Node] = {}
    nodes: list[Node] = []

    def remap(v: Value) -> Value:
        return Value(mapping.get(id(v.node), v.node), v.index)

    for node in fn.nodes:
        new = node
        if node.op == "param":
            info = params[str(node.attrs["name"])]
            if node.out_types != (info.type,):
                new = Node("param", (), dict(node.attrs), (info.type,))
        elif any(id(v.node) in mapping for v in node.inputs):
            new = Node(node.op, tuple(remap(v) for v in node.inputs), dict(node.attrs), node.out_types)
        if new is not node:
            mapping[id(node)] = new
        nodes.append(new)
    return Function(fn.name, nodes, {k: remap(v) for k, v in fn.outputs.items()})
