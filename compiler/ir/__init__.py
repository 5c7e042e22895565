"""llmc's intermediate representation: typed SSA graphs of LLM-level ops.

Parameters are referenced by name and never copied into the graph; weights live in a
:class:`~llmc.compiler.weights.WeightStore` beside the module.
"""

from llmc.compiler.ir.graph import Function, Module, Node, ParamInfo, Value
from llmc.compiler.ir.types import DTYPES, Dim, QuantSpec, TensorType

__all__ = [
    "DTYPES",
    "Dim",
    "Function",
    "Module",
    "Node",
    "ParamInfo",
    "QuantSpec",
    "TensorType",
    "Value",
]
