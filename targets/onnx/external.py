"""Initializers stored as ONNX external data, written straight to ``model.onnx.data``.

Each tensor's bytes go to the data file as it is added (aligned, so ONNX Runtime can map
them), and only a small :class:`onnx.TensorProto` reference stays in memory; a 2 GB model
never exists as one protobuf. The writer also keeps an index (offset, length, dtype, shape
per initializer) so that the weights can be read back without parsing the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN_SMALL = 64
ALIGN_LARGE = 4096
LARGE = 1 << 16


def onnx_dtype(dtype: np.dtype) -> int:
    """The TensorProto element type of a numpy dtype (bfloat16 via ml_dtypes)."""
    if dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    return helper.np_dtype_to_tensor_dtype(dtype)


class ExternalData:
    """Appends tensors to one external data file and hands out references to them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = path.name
        self.file = path.open("wb")
        self.offset = 0
        self.index: dict[str, dict[str, Any]] = {}

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        """Write ``array`` under ``name``; returns the initializer referencing it."""
        if name in self.index:
            raise ValueError(f"initializer {name!r} written twice")
        array = np.ascontiguousarray(array)
        align = ALIGN_LARGE if array.nbytes >= LARGE else ALIGN_SMALL
        pad = -self.offset % align
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        data = array.tobytes()
        self.file.write(data)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = onnx_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        for key, value in (("location", self.location), ("offset", self.offset), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = TensorProto.EXTERNAL
        self.index[name] = {"offset": self.offset, "length": len(data), "dtype": array.dtype.name,
                            "shape": list(array.shape)}
        self.offset += len(data)
        return tensor

    def close(self) -> None:
        self.file.close()


def read_tensor(data_file: Path, record: dict[str, Any]) -> np.ndarray:
    """One initializer back from the data file, by its index record."""
    from llmc.compiler.weights import NUMPY_DTYPES

    dtype = NUMPY_DTYPES.get(record["dtype"], np.dtype(record["dtype"]))
    count = int(np.prod(record["shape"], dtype=np.int64))
    with data_file.open("rb") as f:
        f.seek(int(record["offset"]))
        array = np.fromfile(f, dtype=dtype, count=count)
    return array.reshape(record["shape"])



def read_payload_weights(meta_file: Path, data_file: Path, read_quantized: Any, what: str) -> Any:
    """Params of an ONNX payload, read back lazily from its external data file.

    ``meta_file`` is the payload index (``initializers`` and ``params`` records); quantized params
    are rebuilt by ``read_quantized(record, tensor)``, where ``tensor(name)`` reads an initializer.
    """
    import json

    from llmc.compiler.errors import ArtifactError
    from llmc.compiler.weights import WeightStore

    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{meta_file}: cannot read the {what} payload index: {exc}") from exc
    index = meta["initializers"]
    tensor = lambda name: read_tensor(data_file, index[name])
    store = WeightStore()
    for name, record in meta["params"].items():
        if record["kind"] == "quant":
            store.set_lazy(name, lambda r=record: read_quantized(r, tensor))
        else:
            store.set_lazy(name, lambda r=record: tensor(r["init"]))
    return store

def check(model_path: Path) -> None:
    """Run ``onnx.checker`` on the saved model (external data resolved beside it)."""
    onnx.checker.check_model(str(model_path))
