"""A small builder for ONNX graphs: unique value names, nodes, constants and weights."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from llmc.targets.onnx.external import ExternalData, onnx_dtype

MS_DOMAIN = "com.microsoft"
OPSET = 23
"""Default-domain opset: 23 has ``RMSNormalization`` (``SimplifiedLayerNormalization`` in the
default domain runs on ONNX Runtime but fails ``onnx.checker``)."""
IR_VERSION = 11


class GraphBuilder:
    """Collects the nodes, initializers, inputs and outputs of one graph."""

    def __init__(self, data: ExternalData) -> None:
        self.data = data
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[ValueInfoProto] = []
        self.outputs: list[ValueInfoProto] = []
        self._used: Counter[str] = Counter()
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        """A value name not used before, derived from ``hint``."""
        hint = hint.replace("/", "_")
        self._used[hint] += 1
        count = self._used[hint]
        return hint if count == 1 else f"{hint}_{count}"

    def node(self, op: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", hint: str | None = None,
             outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        """Append a node; returns its output names (``""`` placeholders stay empty)."""
        names = list(outputs) if outputs is not None else [self.fresh(f"{hint or op}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.fresh(f"n_{hint or op}"),
                                           domain=domain, **attrs))
        return names

    def one(self, op: str, inputs: Sequence[str], domain: str = "", hint: str | None = None, **attrs: Any) -> str:
        return self.node(op, inputs, 1, domain, hint, **attrs)[0]

    def const(self, value: Any, dtype: Any = np.int64, hint: str = "c") -> str:
        """A small constant embedded in the model (deduplicated)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.name, array.tobytes(), array.shape)
        if key not in self._consts:
            name = self.fresh(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        """A large tensor written to the external data file."""
        name = self.fresh(name)
        self.initializers.append(self.data.add(name, array))
        return name

    def add_input(self, name: str, dtype: np.dtype | type, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(np.dtype(dtype)), list(shape)))
        self._used[name] += 1
        return name

    def add_output(self, name: str, dtype: np.dtype | type, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(np.dtype(dtype)), list(shape)))

    def model(self, name: str, doc: str) -> Any:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION,
            producer_name="llmc",
            doc_string=doc,
        )
        return model
