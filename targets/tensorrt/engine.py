"""TensorRT engines: optimization profiles, the build, and the version/GPU check at load.

Everything that needs the ``tensorrt`` package imports it inside the function, so this module
(and the pure functions :func:`profile_shapes` and :func:`check_engine_compat`) work without it.

Engines are tied to the TensorRT version that built them and to the GPU's compute capability;
the manifest records both (``engine.tensorrt_version``, ``engine.compute_capability``) and
:func:`check_engine_compat` refuses an engine built for another one with a message that says
how to rebuild, instead of a deserialization failure deep inside TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError, TargetUnavailableError

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Profile:
    """min / opt / max of the dynamic dims of the graph (one TensorRT optimization profile)."""

    batch: tuple[int, int, int]
    sequence: tuple[int, int, int]
    past: tuple[int, int, int]

    def to_dict(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "sequence": list(self.sequence), "past": list(self.past)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(tuple(data["batch"]), tuple(data["sequence"]), tuple(data["past"]))  # type: ignore[arg-type]


def default_profile(config: ModelConfig, options: dict[str, Any]) -> Profile:
    """The profile from target options ``max_batch``, ``max_sequence``, ``max_past`` (and ``opt_*``).

    ``past`` starts at 1: the executor always feeds at least one (masked) past entry, so no
    tensor of the engine ever has a zero-sized dim.
    """
    ctx = config.max_position
    max_batch = int(options.get("max_batch", 32))
    max_seq = int(options.get("max_sequence", min(ctx, 512)))
    max_past = int(options.get("max_past", ctx))
    profile = Profile(
        (1, int(options.get("opt_batch", min(8, max_batch))), max_batch),
        (1, int(options.get("opt_sequence", 1)), max_seq),
        (1, int(options.get("opt_past", max(1, max_past // 2))), max_past),
    )
    for name, (lo, opt, hi) in profile.to_dict().items():
        if not 1 <= lo <= opt <= hi:
            raise LlmcError(f"tensorrt profile {name}: need 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return profile


def profile_shapes(profile: Profile, config: ModelConfig) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input under ``profile``."""
    b, s, p = profile.batch, profile.sequence, profile.past
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {
        "input_ids": tuple((b[i], s[i]) for i in range(3)),
        "positions": tuple((b[i], s[i]) for i in range(3)),
        "past_lengths": tuple((b[i],) for i in range(3)),
        "logits_index": ((1,), (b[1] * s[1],), (b[2] * s[2],)),
    }
    kv = tuple((b[i], config.num_kv_heads, p[i], config.head_dim) for i in range(3))
    for layer in range(config.num_layers):
        for kind in ("key", "value"):
            shapes[f"past_key_values.{layer}.{kind}"] = kv
    return shapes


def tensorrt_missing() -> str | None:
    """None when ``import tensorrt`` works, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return (f"the tensorrt Python package is not importable ({exc}); pip install 'llmc-toolchain[tensorrt]' "
                "on a machine that can reach NVIDIA's package index")
    return None


def runtime_info(device_index: int = 0) -> dict[str, Any]:
    """The TensorRT version and the GPU of this machine (needs tensorrt and a CUDA GPU)."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise TargetUnavailableError("TensorRT engines need a CUDA GPU; torch sees none here")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"tensorrt_version": str(trt.__version__), "compute_capability": f"{major}.{minor}",
            "gpu_name": torch.cuda.get_device_name(device_index)}


def check_engine_compat(recorded: dict[str, Any], runtime: dict[str, Any]) -> None:
    """Refuse an engine built for another TensorRT version or GPU (pure: manifest vs this machine)."""
    problems = []
    want, have = recorded.get("tensorrt_version"), runtime.get("tensorrt_version")
    if want != have:
        problems.append(f"it was built with TensorRT {want}, this machine has TensorRT {have}")
    want_cc, have_cc = recorded.get("compute_capability"), runtime.get("compute_capability")
    if want_cc != have_cc:
        problems.append(f"it was built for a GPU of compute capability {want_cc} ({recorded.get('gpu_name')}), "
                        f"this GPU is {have_cc} ({runtime.get('gpu_name')})")
    if problems:
        raise TargetUnavailableError(
            "the TensorRT engine in this artifact cannot run here: " + "; ".join(problems),
            hint="recompile the model with `llmc compile SOURCE --target tensorrt` on this machine, or run the "
                 "TensorRT-ready ONNX graph under ONNX Runtime with `--device cpu-ort`")


def build_engine(onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], precision: str = "fp32",
                 workspace_mib: int | None = None) -> bytes:
    """Parse ``onnx_path`` (external data beside it), add one profile, build; the serialized engine.

    ``fp32``: a strongly typed network, so every tensor keeps its ONNX type (float32 activations,
    INT4/INT8 weights through their DequantizeLinear). ``fp16`` / ``bf16``: a weakly typed
    network with that builder flag, letting TensorRT pick lower-precision kernels.
    """
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise LlmcError(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if precision == "fp32":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LlmcError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # float32 means float32 (TensorRT enables TF32 by default)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        config.set_flag(trt.BuilderFlag.BF16)
    if workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LlmcError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(serialized)
