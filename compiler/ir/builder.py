"""Builds functions node by node, inferring result types from the op table."""

from __future__ import annotations

from llmc.compiler.errors import IRError
from llmc.compiler.ir.graph import AttrValue, Function, Node, ParamInfo, Value
from llmc.compiler.ir.ops import OPS, TypeCheckError
from llmc.compiler.ir.types import TensorType


class Builder:
    """Appends nodes in order; ``params`` gives the types of ``param`` nodes."""

    def __init__(self, params: dict[str, ParamInfo]) -> None:
        self.params = params
        self.nodes: list[Node] = []

    def input(self, name: str, type_: TensorType) -> Value:
        node = Node("input", (), {"name": name}, (type_,))
        self.nodes.append(node)
        return node.out()

    def param(self, name: str) -> Value:
        if name not in self.params:
            raise IRError(f"param {name!r} is not declared in the module")
        node = Node("param", (), {"name": name}, (self.params[name].type,))
        self.nodes.append(node)
        return node.out()

    def node(self, op: str, *inputs: Value, **attrs: AttrValue) -> Node:
        """Append a node of ``op``; its result types come from the op's type rule."""
        opdef = OPS.get(op)
        if opdef is None:
            raise IRError(f"unknown op {op!r}")
        try:
            out_types = opdef.infer([v.type for v in inputs], attrs)
        except (TypeCheckError, KeyError) as exc:
            raise IRError(f"cannot build {op}: {exc}") from exc
        node = Node(op, tuple(inputs), dict(attrs), out_types)
        self.nodes.append(node)
        return node

    def op(self, op: str, *inputs: Value, **attrs: AttrValue) -> Value:
        """Like :meth:`node` for single-result ops; returns the result."""
        return self.node(op, *inputs, **attrs).out()

    def function(self, name: str, outputs: dict[str, Value]) -> Function:
        return Function(name, list(self.nodes), dict(outputs))
