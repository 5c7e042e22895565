"""Text form of the IR. :func:`parse_module` (parser.py) reads it back exactly.

    llmc-ir 1
    config {"hidden_size": 64, ...}
    param "model.norm.weight" : float32[64]
    func decode {
      %0 = input {"name": "input_ids"} : int64[tokens]
      %3 = add_rms_norm(%1, %2, %0) {"eps": 1e-05} : float32[tokens, 64], float32[tokens, 64]
      return {"logits": %9, "hidden": %3.1}
    }
"""

from __future__ import annotations

import json

from llmc.compiler.ir.graph import Function, Module, Node, Value

FORMAT_HEADER = "llmc-ir 1"


def _attr_json(attrs: dict[str, object]) -> str:
    return json.dumps(attrs, sort_keys=True)


def format_node_ref(node: Node) -> str:
    """One-line description of a node for error messages (no numbering)."""
    ins = ", ".join(str(v.type) for v in node.inputs)
    return f"{node.op}({ins}) {_attr_json(node.attrs)}"


def print_function(fn: Function) -> str:
    names: dict[int, str] = {}

    def ref(value: Value) -> str:
        base = names.get(id(value.node), "%?")
        return base if value.index == 0 and len(value.node.out_types) == 1 else f"{base}.{value.index}"

    lines = [f"func {fn.name} {{"]
    for i, node in enumerate(fn.nodes):
        names[id(node)] = f"%{i}"
        args = f"({', '.join(ref(v) for v in node.inputs)})" if node.inputs else ""
        types = ", ".join(str(t) for t in node.out_types)
        lines.append(f"  %{i} = {node.op}{args} {_attr_json(node.attrs)} : {types}")
    outs = ", ".join(f"{json.dumps(k)}: {ref(v)}" for k, v in fn.outputs.items())
    lines.append(f"  return {{{outs}}}")
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = [FORMAT_HEADER]
    lines.append(f"meta {json.dumps(module.meta, sort_keys=True)}")
    lines.append(f"config {json.dumps(module.config, sort_keys=True)}")
    for info in module.params.values():
        quant = ""
        if info.quant is not None:
            quant = f" quant {info.quant.describe()}/{info.quant.scale_dtype}"
        lines.append(f"param {json.dumps(info.name)} : {info.type}{quant}")
    lines.extend(print_function(fn) for fn in module)
    return "\n".join(lines) + "\n"
