"""The torch target: the artifact is the IR plus weights; lowering happens at load."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.targets.base import EmitResult, Executor, Target

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

PAYLOAD = "target/torch.json"


class TorchTarget(Target):
    name = "torch"
    doc = "PyTorch eager kernels over a paged KV cache (CPU, or CUDA when available)"
    fused_ops = frozenset({"add_rms_norm", "swiglu", "rope_attention"})
    skipped_fusions = ("fuse-gate-up",)
    """Fusions the target can run but leaves out of its O2/O3: measured slower on torch CPU
    (docs/performance.md, "Passes: O0 vs O2"). ``--passes`` can still ask for them."""

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
        }
        writer.path(PAYLOAD).write_text(json.dumps(opts, indent=1))
        return EmitResult(options=opts, files=[PAYLOAD])

    def load(self, artifact: Artifact, **options: Any) -> Executor:
        from llmc.targets.torch.executor import TorchExecutor

        saved = artifact.target_options
        device = options.get("device") or saved.get("device", "cpu")
        return TorchExecutor(
            artifact.module,
            artifact.weights(),
            device=device,
            block_size=int(options.get("block_size") or saved.get("block_size", 16)),
            activation_dtype=saved.get("activation_dtype", "float32"),
            threads=options.get("threads"),
            deterministic=bool(options.get("deterministic", False)),
            quant_kernels=str(options.get("quant_kernels") or saved.get("quant_kernels", "auto")),
        )
