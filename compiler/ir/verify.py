"""The IR verifier: rejects malformed graphs with a message naming the node."""

from __future__ import annotations

from llmc.compiler.errors import IRError
from llmc.compiler.ir.graph import Function, Module, Node
from llmc.compiler.ir.ops import OPS, TypeCheckError


def verify_module(module: Module) -> None:
    """Raise :class:`IRError` naming the first malformed node of any function."""
    for name, fn in module.functions.items():
        if fn.name != name:
            raise IRError(f"function registered as {name!r} is named {fn.name!r}")
        verify_function(fn, module)


def verify_function(fn: Function, module: Module) -> None:
    from llmc.compiler.ir.printer import format_node_ref

    defined: set[int] = set()
    input_names: set[str] = set()
    for position, node in enumerate(fn.nodes):
        where = f"function {fn.name!r}, node #{position} ({format_node_ref(node)})"
        if id(node) in defined:
            raise IRError(f"{where}: node appears twice")
        problem = _check_node(node, module, defined)
        if problem:
            raise IRError(f"{where}: {problem}")
        if node.op == "input":
            name = str(node.attrs["name"])
            if name in input_names:
                raise IRError(f"{where}: duplicate input {name!r}")
            input_names.add(name)
        defined.add(id(node))
    if not fn.outputs:
        raise IRError(f"function {fn.name!r} returns nothing")
    for out_name, value in fn.outputs.items():
        if id(value.node) not in defined:
            raise IRError(f"function {fn.name!r}: output {out_name!r} is not defined in it")
        if value.index >= len(value.node.out_types):
            raise IRError(f"function {fn.name!r}: output {out_name!r} reads a missing result")


def _check_node(node: Node, module: Module, defined: set[int]) -> str | None:
    opdef = OPS.get(node.op)
    if opdef is None:
        return f"unknown op {node.op!r}"
    if len(node.inputs) != opdef.num_inputs:
        return f"expects {opdef.num_inputs} operands, has {len(node.inputs)}"
    missing = [a for a in opdef.attrs if a not in node.attrs]
    if missing:
        return f"missing attributes {missing}"
    unknown = [a for a in node.attrs if a not in opdef.attrs + opdef.optional_attrs]
    if unknown:
        return f"unknown attributes {unknown}"
    for i, value in enumerate(node.inputs):
        if id(value.node) not in defined:
            return f"operand {i} is used before it is defined (or comes from another function)"
        if value.index >= len(value.node.out_types):
            return f"operand {i} reads result {value.index} of a node with fewer results"
    if node.op == "param":
        name = str(node.attrs["name"])
        info = module.params.get(name)
        if info is None:
            return f"param {name!r} is not declared in the module"
        if node.out_types != (info.type,):
            return f"param {name!r} typed {node.out_types[0]} but declared {info.type}"
        return None
    if node.op == "input":
        return None if len(node.out_types) == 1 else "an input has exactly one result"
    try:
        expected = opdef.infer([v.type for v in node.inputs], node.attrs)
    except (TypeCheckError, KeyError, TypeError, ValueError) as exc:
        return str(exc)
    if expected != node.out_types:
        got = ", ".join(map(str, node.out_types))
        want = ", ".join(map(str, expected))
        return f"result types ({got}) do not match the op's rule ({want})"
    return None
