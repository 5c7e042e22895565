"""Graph structures of the IR: values, nodes, functions and modules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.ir.types import QuantSpec, TensorType

AttrValue = int | float | str | bool | tuple[int, ...] | tuple[float, ...] | None


@dataclass(frozen=True, eq=False)
class Value:
    """The ``index``-th result of ``node``."""

    node: Node
    index: int = 0

    @property
    def type(self) -> TensorType:
        return self.node.out_types[self.index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Value) and other.node is self.node and other.index == self.index

    def __hash__(self) -> int:
        return hash((id(self.node), self.index))


class Node:
    """One operation. Nodes are never mutated once built; passes build new ones."""

    __slots__ = ("attrs", "inputs", "op", "out_types")

    def __init__(
        self,
        op: str,
        inputs: tuple[Value, ...],
        attrs: dict[str, AttrValue],
        out_types: tuple[TensorType, ...],
    ) -> None:
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.out_types = out_types

    def out(self, index: int = 0) -> Value:
        return Value(self, index)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(Value(self, i) for i in range(len(self.out_types)))

    def __repr__(self) -> str:
        return f"Node({self.op}, attrs={self.attrs})"


@dataclass(frozen=True)
class ParamInfo:
    """A named weight: its logical type (``[out, in]`` for matmul weights) and quantization."""

    name: str
    type: TensorType
    quant: QuantSpec | None = None


@dataclass
class Function:
    """An entry point: nodes in topological order and the named values it returns."""

    name: str
    nodes: list[Node]
    outputs: dict[str, Value]

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    def input(self, name: str) -> Node:
        for node in self.inputs:
            if node.attrs["name"] == name:
                return node
        raise KeyError(f"function {self.name!r} has no input {name!r}")

    def users(self) -> dict[Node, list[Node]]:
        """Map each node to the nodes that read one of its results."""
        uses: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for node in self.nodes:
            for value in node.inputs:
                uses[value.node].append(node)
        return uses

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items()))


@dataclass
class Module:
    """Functions sharing one set of named parameters and one model config."""

    functions: dict[str, Function]
    params: dict[str, ParamInfo]
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Function]:
        return iter(self.functions.values())

    def referenced_params(self) -> set[str]:
        return {
            str(node.attrs["name"]) for fn in self for node in fn.nodes if node.op == "param"
        }

    def op_counts(self) -> dict[str, dict[str, int]]:
        return {fn.name: fn.op_counts() for fn in self}
