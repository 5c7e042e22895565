"""The torch target: the artifact is the IR plus weights; lowering happens at load."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.ggml_blocks import FORMATS
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor
from llmc.runtime.target import Capabilities, EmitResult, Target, TargetOption, lowered_ops

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

PAYLOAD = "target/torch.json"
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
QUANT_KERNELS = ("auto", "torch", "dequant")
STEP_MODES = ("auto", "ops")  # llmc.targets.torch.executor.STEP_MODES (not imported: capabilities stay cheap)
CUDA_EXECUTORS = ("graphs", "eager")
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")  # llmc.targets.torch.executor.KV_CACHE_DTYPES
_BLOCK_SIZE = TargetOption("block_size", int, "tokens per KV cache block (16)", minimum=1)
_QUANT_KERNELS = TargetOption("quant_kernels", str, "quantized matmuls: auto (llmc's int8-activation CPU kernels), "
                              "torch (torch's packed kernels) or dequant (dequantize on the fly)", QUANT_KERNELS)
_STEP = TargetOption("step", str, "auto (CPU: one native call per step when every matmul runs on llmc's kernels) "
                     "or ops (torch ops per IR op)", STEP_MODES)
_KV_CACHE_DTYPE = TargetOption("kv_cache_dtype", str, "KV cache elements: auto (float16 where the native CPU step "
                               "runs, else the activation dtype), float32, float16 or bfloat16", KV_CACHE_DTYPES)


class TorchTarget(Target):
    name = "torch"
    doc = "PyTorch eager kernels over a paged KV cache (CPU, or CUDA when available)"
    compile_options = (
        TargetOption("activation_dtype", str, "dtype of activations and the KV cache", ACTIVATION_DTYPES),
        _BLOCK_SIZE,
        _QUANT_KERNELS,
        _STEP,
        _KV_CACHE_DTYPE,
    )
    load_options = (_BLOCK_SIZE, _QUANT_KERNELS, _STEP, _KV_CACHE_DTYPE, TargetOption(
        "cuda_executor", str, "on cuda: graphs (Triton kernels, decode steps replayed from CUDA graphs, sampling "
        "on the device; the default) or eager (torch ops step by step, host sampling)", CUDA_EXECUTORS))
    skipped_fusions = ("fuse-gate-up",)
    """Fusions the target can run but leaves out of its O2/O3: measured slower on torch CPU
    (docs/performance.md, "Passes: O0 vs O2"). ``--passes`` can still ask for them."""

    def capabilities(self) -> Capabilities:
        return Capabilities(ops=lowered_ops("add_rms_norm", "swiglu", "rope_attention", "packed_rope_attention"),
                            devices=("cpu", "cuda"), kv_layout="paged", gguf_blocks=frozenset(FORMATS),
                            deterministic=True, runs_in_memory=True)

    def preferred_passes(self, opt_level: int) -> list[str] | None:
        if opt_level < 2:
            return None
        from llmc.passes.pipelines import PIPELINES

        return [p for p in PIPELINES[f"O{opt_level}"] if p not in self.skipped_fusions]

    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        opts = {
            "device": options.get("device", "cpu"),
            "activation_dtype": options.get("activation_dtype", "float32"),
            "block_size": int(options.get("block_size", 16)),
            "quant_kernels": str(options.get("quant_kernels", "auto")),
            "step": str(options.get("step", "auto")),
            "kv_cache_dtype": str(options.get("kv_cache_dtype", "auto")),
        }
        writer.path(PAYLOAD).write_text(json.dumps(opts, indent=1))
        return EmitResult(options=opts, files=[PAYLOAD])

    def kv_layout(self, artifact: Artifact) -> tuple[int, int]:
        """The cache's bytes per token and block size as the executor will allocate it: for
        ``kv_cache_dtype=auto``, float16 where the native CPU step runs (judged from the recorded
        options and the manifest: every matrix but the embedding quantized), else the activations'."""
        from llmc.runtime.capacity import kv_bytes_per_token

        options = artifact.target_options
        dtype = str(options.get("kv_cache_dtype") or "auto")
        if dtype == "auto":
            dtype = str(options.get("activation_dtype") or "float32")
            native = dtype == "float32" and options.get("device", "cpu") == "cpu" \
                and options.get("step", "auto") == "auto" and options.get("quant_kernels", "auto") == "auto" \
                and all("quant" in p for name, p in artifact.manifest["params"].items()
                        if len(p["shape"]) == 2 and name != "embed")
            dtype = "float16" if native else dtype
        return kv_bytes_per_token(artifact.config, dtype), int(options.get("block_size") or 16)

    def load(self, artifact: Artifact, **options: Any) -> Executor:
        return self.load_module(artifact.module, artifact.weights(), saved=artifact.target_options, **options)

    def load_module(self, module: Module, weights: WeightStore, saved: dict[str, Any] | None = None,
                    **options: Any) -> Executor:
        """A :class:`~llmc.targets.torch.executor.TorchExecutor`, or on a CUDA GPU the
        :class:`~llmc.targets.torch.cuda.executor.CudaTorchExecutor` (unless ``cuda_executor=eager`` or
        ``deterministic``); ``saved`` holds the options recorded
        at compile time (an artifact's), which ``options`` override."""
        from llmc.targets.torch.executor import TorchExecutor

        saved = saved or {}
        device = options.get("device") or saved.get("device", "cpu")
        if str(device).startswith("cuda") and not options.get("deterministic") \
                and (options.get("cuda_executor") or "graphs") == "graphs":
            executor = cuda_executor(module, weights, device, options, saved)
            if executor is not None:
                return executor
        return TorchExecutor(
            module,
            weights,
            device=device,
            block_size=int(options.get("block_size") or saved.get("block_size", 16)),
            activation_dtype=saved.get("activation_dtype", "float32"),
            threads=options.get("threads"),
            deterministic=bool(options.get("deterministic", False)),
            quant_kernels=str(options.get("quant_kernels") or saved.get("quant_kernels", "auto")),
            step=str(options.get("step") or saved.get("step", "auto")),
            kv_cache_dtype=str(options.get("kv_cache_dtype") or saved.get("kv_cache_dtype", "auto")),
        )


def cuda_executor(module: Module, weights: WeightStore, device: str, options: dict[str, Any],
                  saved: dict[str, Any]) -> Executor | None:
    """The CUDA executor (:mod:`llmc.targets.torch.cuda`) where torch sees a GPU (else None: the torch
    executor then refuses the device with the reason); refuses a missing triton with the fix."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from llmc.targets.torch.cuda.executor import CudaTorchExecutor
    except ModuleNotFoundError as exc:
        if exc.name != "triton":
            raise
        raise LlmcError("the torch target's CUDA executor needs triton (pip install 'llmc-toolchain[triton]'); "
                        "or load with the option cuda_executor=eager") from exc
    return CudaTorchExecutor(module, weights, device=device,
                             block_size=int(options.get("block_size") or saved.get("block_size", 16)),
                             activation_dtype=saved.get("activation_dtype", "float32"),
                             threads=options.get("threads"),
                             kv_cache_dtype=str(options.get("kv_cache_dtype") or saved.get("kv_cache_dtype", "auto")))
