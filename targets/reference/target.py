"""The reference target: the IR and weights as written by the driver, run at load by llmc's
reference interpreter (:mod:`llmc.compiler.ir.interp`) through the executor contract.

It lowers every op and every quantization (weights are dequantized to the compute dtype), on
the CPU only and slowly: it is the oracle other targets are compared with through the same
:class:`~llmc.runtime.executor.Executor` interface, and runs in-memory modules
(:meth:`ReferenceTarget.load_module`) as well as artifacts. Options: ``dtype`` (``float64``,
the default, or ``float32``) and ``block_size`` (16).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor
from llmc.runtime.target import Capabilities, EmitResult, Target, lowered_ops

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

PAYLOAD = "target/reference.json"


class ReferenceTarget(Target):
    name = "reference"
    doc = "llmc's reference interpreter (NumPy, float64) over a paged KV cache: every op, slow; the oracle of tests"

    def capabilities(self) -> Capabilities:
        return Capabilities(ops=lowered_ops(*sorted(FUSED_OPS)), devices=("cpu",), kv_layout="paged",
                            runs_in_memory=True)

    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        from llmc.targets.reference.lower import REFERENCE_OPS

        REFERENCE_OPS.check_module(module)
        opts = {"device": "cpu", "dtype": str(options.get("dtype", "float64")),
                "block_size": int(options.get("block_size", 16))}
        writer.path(PAYLOAD).write_text(json.dumps(opts, indent=1))
        return EmitResult(options=opts, files=[PAYLOAD])

    def load(self, artifact: Artifact, **options: Any) -> Executor:
        return self.load_module(artifact.module, artifact.weights(), saved=artifact.target_options, **options)

    def load_module(self, module: Module, weights: WeightStore, saved: dict[str, Any] | None = None,
                    **options: Any) -> Executor:
        """A :class:`~llmc.targets.reference.executor.ReferenceExecutor`; ``saved`` holds the options
        recorded at compile time (an artifact's), which ``options`` override."""
        from llmc.targets.reference.executor import ReferenceExecutor

        saved = saved or {}
        device = options.get("device") or "cpu"
        if device.split(":", 1)[0] != "cpu":
            raise UnsupportedError(f"the reference target runs on the cpu, not {device!r}")
        block_size = int(options.get("block_size") or saved.get("block_size", 16))
        return ReferenceExecutor(module, weights, block_size=block_size,
                                 dtype=str(options.get("dtype") or saved.get("dtype", "float64")))
