"""The ONNX target: ``target/model.onnx`` + ``model.onnx.data`` (the weights) + ``onnx.json``.

The payload holds the weights (``Capabilities.stores_weights``), so the driver writes no second copy in
``weights/``; :meth:`OnnxTarget.read_weights` reads them back from the ONNX data file.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import LlmcError, TargetUnavailableError, UnsupportedError
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor
from llmc.runtime.target import Capabilities, EmitResult, Target, TargetOption, lowered_ops
from llmc.targets.onnx.session import OPT_LEVELS

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

MODEL = "target/model.onnx"
DATA = "target/model.onnx.data"
META = "target/onnx.json"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
GQA_ROTARY_HEAD_MULTIPLE = 16
GQA_ROTARY_PAIRS_MULTIPLE = 8
"""GroupQueryAttention applies RoPE itself when ``head_dim`` and ``rotary_dim / 2`` are multiples of these
(its rotary kernel's vector widths); otherwise RoPE is applied with standard ops before it."""


class OnnxTarget(Target):
    name = "onnx"
    doc = ("ONNX Runtime: one ONNX graph with MatMulNBits, GroupQueryAttention and "
           "SkipSimplifiedLayerNormalization over a slot KV cache (CPU EP; CUDA/TensorRT EPs with onnxruntime-gpu)")
    compile_options = (
        TargetOption("accuracy_level", int, "MatMulNBits accuracy_level (4: int8 activations)", ACCURACY_LEVELS),
    )
    load_options = (
        TargetOption("inter_op_threads", int, "ONNX Runtime inter-op threads", minimum=1),
        TargetOption("kv_capacity", int, "tokens per KV slot (default: the model context)", minimum=1),
        TargetOption("optimization", str, "ONNX Runtime graph optimization level", OPT_LEVELS),
        TargetOption("tensorrt", bool, "use the TensorRT execution provider where onnxruntime-gpu has it"),
    )

    def capabilities(self) -> Capabilities:
        return Capabilities(ops=lowered_ops("add_rms_norm", "swiglu", "rope_attention", "packed_rope_attention"),
                            devices=("cpu", "cuda"), kv_layout="slots", stores_weights=True)

    def rewrites(self, opt_level: int) -> list[str]:
        """GroupQueryAttention reads a fused qkv projection as its packed query (no split, no copies)
        where it applies RoPE itself."""
        return [f"pack-qkv-attention(head_dim_multiple={GQA_ROTARY_HEAD_MULTIPLE},"
                f"rotary_pairs_multiple={GQA_ROTARY_PAIRS_MULTIPLE})"]

    def availability(self) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"{exc.name} is not installed (pip install 'llmc-toolchain[onnx]')"
        return None

    def _require(self) -> None:
        reason = self.availability()
        if reason is not None:
            raise TargetUnavailableError(f"target 'onnx' is not available here: {reason}")

    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        self._require()
        from llmc.targets.onnx.external import ExternalData, check
        from llmc.targets.onnx.graph import IR_VERSION, OPSET, GraphBuilder
        from llmc.targets.onnx.lower import Lowering

        level = int(options.get("accuracy_level", 0))
        if level not in ACCURACY_LEVELS:
            raise LlmcError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {level}")
        data = ExternalData(writer.path(DATA))
        try:
            graph = GraphBuilder(data)
            lowering = Lowering(module, weights, graph, accuracy_level=level)
            lowering.run()
        finally:
            data.close()
        model = graph.model("llmc", f"llmc {module.meta.get('source', '')}")
        writer.path(MODEL).write_bytes(model.SerializeToString())
        check(writer.path(MODEL))
        ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
        stats = lowering.stats
        opts = {
            "device": options.get("device", "cpu"),
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "accuracy_level": level,
            "kv_layout": "slots",
            "rope": {"in_gqa": stats.gqa_rotary, "explicit": stats.explicit_rope},
            "packed_qkv": stats.packed_qkv,
            "linear": {"matmulnbits": stats.matmulnbits, "dequant": stats.dequant_linear, "float": stats.float_linear},
        }
        meta = {"model": "model.onnx", "data": "model.onnx.data", "options": opts,
                "inputs": [i.name for i in model.graph.input], "onnx_ops": dict(sorted(ops.items())),
                "params": lowering.param_records, "initializers": data.index}
        writer.path(META).write_text(json.dumps(meta, indent=1))
        notes = ["onnx ops: " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items()))]
        return EmitResult(options=opts, files=[MODEL, DATA, META], notes=notes)

    def load(self, artifact: Artifact, **options: Any) -> Executor:
        self._require()
        from llmc.targets.onnx.executor import OnnxExecutor

        if options.get("deterministic"):
            raise UnsupportedError("the onnx target has no deterministic (batch-invariant) mode; "
                                   "ONNX Runtime picks kernels by batch shape")
        saved = artifact.target_options
        return OnnxExecutor(
            artifact.file(MODEL),
            artifact.config,
            device=options.get("device") or saved.get("device", "cpu"),
            threads=options.get("threads"),
            inter_op_threads=options.get("inter_op_threads"),
            kv_capacity=options.get("kv_capacity"),
            optimization=options.get("optimization") or "all",
            tensorrt=options.get("tensorrt"),
        )

    def read_weights(self, artifact: Artifact) -> WeightStore:
        """The params, read back lazily from ``model.onnx.data`` (bit-identical to what was emitted)."""
        from llmc.targets.onnx.external import read_payload_weights
        from llmc.targets.onnx.quant import read_quantized

        store: WeightStore = read_payload_weights(artifact.file(META), artifact.file(DATA), read_quantized, "onnx")
        return store
