"""Reads the text form written by :mod:`printer` back into a :class:`Module`."""

from __future__ import annotations

import json
import re
from typing import Any

from llmc.compiler.errors import IRError
from llmc.compiler.ir.graph import Function, Module, Node, ParamInfo, Value
from llmc.compiler.ir.printer import FORMAT_HEADER
from llmc.compiler.ir.types import Dim, QuantSpec, TensorType

_NODE = re.compile(r"^%(\d+) = ([a-z_0-9]+)(?:\((.*?)\))? (\{.*\}) : (.+)$")
_PARAM = re.compile(r'^param ("(?:[^"\\]|\\.)*") : (\S+(?:\[[^\]]*\])?)(?: quant (\S+)/(\S+))?$')
_TYPE = re.compile(r"([a-z0-9]+)(?:\[(.*?)\])?")


def parse_type(text: str) -> TensorType:
    text = text.strip()
    if text == "kvcache":
        return TensorType((), "kvcache")
    match = _TYPE.fullmatch(text)
    if match is None:
        raise IRError(f"bad type {text!r}")
    dims: list[Dim] = []
    if match.group(2):
        for part in match.group(2).split(","):
            part = part.strip()
            dims.append(int(part) if part.lstrip("-").isdigit() else part)
    return TensorType(tuple(dims), match.group(1))


def _split_types(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _attrs(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def parse_module(text: str) -> Module:
    """Parse a module; errors name the line."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != FORMAT_HEADER:
        raise IRError(f"not llmc IR text (expected header {FORMAT_HEADER!r})")
    module = Module(functions={}, params={})
    i = 1
    while i < len(lines):
        line = lines[i].strip()
        try:
            if not line:
                i += 1
            elif line.startswith("meta "):
                module.meta = json.loads(line[5:])
                i += 1
            elif line.startswith("config "):
                module.config = json.loads(line[7:])
                i += 1
            elif line.startswith("param "):
                info = _parse_param(line)
                module.params[info.name] = info
                i += 1
            elif line.startswith("func "):
                fn, i = _parse_function(lines, i)
                module.functions[fn.name] = fn
            else:
                raise IRError("unexpected text")
        except (ValueError, KeyError, IndexError) as exc:
            raise IRError(f"IR line {i + 1}: {exc}: {line[:120]!r}") from exc
    return module


def _parse_param(line: str) -> ParamInfo:
    match = _PARAM.match(line)
    if match is None:
        raise IRError(f"bad param line: {line!r}")
    quant = None
    if match.group(3):
        quant = QuantSpec.parse(match.group(3), match.group(4))
    return ParamInfo(json.loads(match.group(1)), parse_type(match.group(2)), quant)


def _parse_function(lines: list[str], start: int) -> tuple[Function, int]:
    header = lines[start].strip()
    if not header.endswith("{"):
        raise IRError(f"IR line {start + 1}: bad function header {header!r}")
    name = header[5:-1].strip()
    nodes: list[Node] = []
    by_number: dict[str, Node] = {}

    def value(ref: str) -> Value:
        ref = ref.strip()
        base, _, index = ref.partition(".")
        if base not in by_number:
            raise IRError(f"IR line {i + 1}: {ref} is not defined above")
        return Value(by_number[base], int(index) if index else 0)

    i = start + 1
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("return "):
            body = line[len("return ") :].strip()
            if not (body.startswith("{") and body.endswith("}")):
                raise IRError(f"IR line {i + 1}: bad return {line!r}")
            outputs: dict[str, Value] = {}
            for item in filter(None, (p.strip() for p in body[1:-1].split(","))):
                key, _, ref = item.rpartition(":")
                outputs[json.loads(key)] = value(ref)
            if i + 1 >= len(lines) or lines[i + 1].strip() != "}":
                raise IRError(f"IR line {i + 2}: expected '}}' after return")
            return Function(name, nodes, outputs), i + 2
        match = _NODE.match(line)
        if match is None:
            raise IRError(f"IR line {i + 1}: bad node {line!r}")
        number, op, args, attrs, types = match.groups()
        inputs = tuple(value(a) for a in args.split(",")) if args else ()
        out_types = tuple(parse_type(t) for t in _split_types(types))
        node = Node(op, inputs, _attrs(json.loads(attrs)), out_types)
        by_number[f"%{number}"] = node
        nodes.append(node)
        i += 1
    raise IRError(f"function {name!r} has no return")
