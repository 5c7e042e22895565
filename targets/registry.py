"""Target registry: names to target classes, imported lazily."""

from __future__ import annotations

import importlib

from llmc.errors import TargetUnavailableError, UnsupportedError
from llmc.targets.base import Target

_TARGETS: dict[str, str] = {
    "torch": "llmc.targets.torch.target:TorchTarget",
    "onnx": "llmc.targets.onnx.target:OnnxTarget",
    "tvm": "llmc.targets.tvm.target:TvmTarget",
    "tensorrt": "llmc.targets.tensorrt.target:TensorRTTarget",
}


def target_names() -> list[str]:
    return list(_TARGETS)


def get_target(name: str) -> Target:
    """The target called ``name``; raises a clear error if unknown or unusable here."""
    spec = _TARGETS.get(name)
    if spec is None:
        raise UnsupportedError(f"unknown target {name!r}; available: {', '.join(_TARGETS)}")
    module_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetUnavailableError(f"target {name!r} cannot be imported: {exc}") from exc
    target: Target = getattr(module, cls_name)()
    return target


def require_available(target: Target) -> None:
    reason = target.availability()
    if reason is not None:
        raise TargetUnavailableError(f"target {target.name!r} is not available here: {reason}")
