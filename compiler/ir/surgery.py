"""Graph surgery shared by passes (the rule engine, cse, dce, quantize): remapping values and
rebuilding functions in topological order, finding live nodes, retyping params.

Nodes are immutable; every edit builds new nodes for what changed and for everything that
reads a changed value, keeping the rest shared.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from llmc.compiler.errors import PassError
from llmc.compiler.ir.graph import Function, Module, Node, ParamInfo, Value
from llmc.compiler.ir.ops import OPS


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


def _resolve(value: Value, remap: Mapping[Value, Value]) -> Value:
    seen = 0
    while value in remap:
        value = remap[value]
        seen += 1
        if seen > 10_000:
            raise PassError("cyclic value remapping")
    return value


def rebuild_nodes(preferred: Sequence[Node], remap: Mapping[Value, Value], outputs: Mapping[str, Value],
                  who: str = "rewrite") -> tuple[list[Node], dict[str, Value]]:
    """Apply ``remap`` to every operand, clone the nodes whose operands changed and order
    ``preferred`` topologically (stable: a node moves only to follow its operands)."""
    present = {id(n): n for n in preferred}
    rank = {id(n): i for i, n in enumerate(preferred)}

    def deps(node: Node) -> list[Node]:
        out = []
        for v in node.inputs:
            dep = _resolve(v, remap).node
            if id(dep) not in present:
                raise PassError(f"{who}: {node.op} reads a result of a removed {dep.op} node")
            out.append(dep)
        return sorted(out, key=lambda n: rank[id(n)])

    order: list[Node] = []
    state: dict[int, int] = {}  # 1 visiting, 2 done
    for root in preferred:
        if state.get(id(root)) == 2:
            continue
        stack: list[tuple[Node, Iterator[Node]]] = [(root, iter(deps(root)))]
        state[id(root)] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
                continue
            s = state.get(id(nxt))
            if s == 1:
                raise PassError(f"{who}: the rewrite created a cycle through {nxt.op}")
            if s is None:
                state[id(nxt)] = 1
                stack.append((nxt, iter(deps(nxt))))
    clones: dict[int, Node] = {}

    def final(v: Value) -> Value:
        v = _resolve(v, remap)
        clone = clones.get(id(v.node))
        return Value(clone, v.index) if clone is not None else v

    result: list[Node] = []
    for node in order:
        inputs = tuple(final(v) for v in node.inputs)
        if any(a != b for a, b in zip(inputs, node.inputs, strict=True)):
            clone = Node(node.op, inputs, dict(node.attrs), node.out_types)
            clones[id(node)] = clone
            node = clone
        result.append(node)
    new_outputs = {name: final(v) for name, v in outputs.items()}
    return result, new_outputs


def drop_unused_params(fn: Function, candidates: set[str]) -> Function:
    """``fn`` without the ``param`` nodes named in ``candidates`` that nothing reads."""
    used = {id(v.node) for n in fn.nodes for v in n.inputs} | {id(v.node) for v in fn.outputs.values()}
    nodes = [n for n in fn.nodes if not (n.op == "param" and id(n) not in used and n.attrs["name"] in candidates)]
    return Function(fn.name, nodes, fn.outputs) if len(nodes) != len(fn.nodes) else fn


def live_nodes(fn: Function) -> list[Node]:
    """The nodes of ``fn`` that reach an output or have a side effect (inputs always stay:
    they are the function's signature)."""
    live: set[int] = set()
    stack = [v.node for v in fn.outputs.values()]
    stack += [n for n in fn.nodes if OPS[n.op].side_effect or n.op == "input"]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.node for v in node.inputs)
    return [n for n in fn.nodes if id(n) in live]
