"""ONNX Runtime sessions: execution providers for a device, thread counts, optimization level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.compiler.errors import TargetUnavailableError

OPT_LEVELS = ("disable", "basic", "extended", "all")


def parse_device(device: str) -> tuple[str, int]:
    """``cpu`` -> ("cpu", 0); ``cuda`` / ``cuda:N`` -> ("cuda", N)."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda"):
        raise TargetUnavailableError(f"the onnx target runs on cpu or cuda[:N], not {device!r}")
    try:
        return kind, int(index or 0)
    except ValueError as exc:
        raise TargetUnavailableError(f"bad device index in {device!r}") from exc


def providers_for(device: str, tensorrt: bool | None = None) -> list[Any]:
    """Execution providers for ``device``: CPU, or TensorRT (when installed) + CUDA + CPU fallback.

    TensorRT takes the subgraphs it supports first when ``onnxruntime-gpu`` ships it and
    ``tensorrt`` is not False; contrib ops it lacks (GroupQueryAttention, MatMulNBits) run on CUDA.
    """
    import onnxruntime as ort

    kind, index = parse_device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise TargetUnavailableError(
            f"device {device!r} requested but this onnxruntime has no CUDA execution provider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu: pip install 'llmc-toolchain[cuda]'"
        )
    providers: list[Any] = []
    if tensorrt is not False and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": index}))
    providers.append(("CUDAExecutionProvider", {"device_id": index}))
    providers.append("CPUExecutionProvider")
    return providers


def create_session(model: Path, device: str = "cpu", threads: int | None = None, inter_op_threads: int | None = None,
                   optimization: str = "all", tensorrt: bool | None = None) -> Any:
    """An InferenceSession on ``model``; raises a clear error when the device cannot be used."""
    import onnxruntime as ort

    if optimization not in OPT_LEVELS:
        raise TargetUnavailableError(f"unknown onnxruntime optimization level {optimization!r}; "
                                     f"choose from {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if inter_op_threads:
        options.inter_op_num_threads = int(inter_op_threads)
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 3
    providers = providers_for(device, tensorrt)
    session = ort.InferenceSession(str(model), options, providers=providers)
    if parse_device(device)[0] == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise TargetUnavailableError(f"device {device!r} requested but onnxruntime could not start its CUDA "
                                     "execution provider (no GPU or a CUDA/cuDNN mismatch)")
    return session
