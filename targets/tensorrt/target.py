"""The TensorRT target: ``target/model.onnx`` (+ ``.data``), ``tensorrt.json`` and, where
TensorRT and a GPU are present at compile time, ``target/model.engine``.

The ONNX graph uses standard ops only (opset 23) and is what TensorRT's ONNX parser reads.
Without TensorRT the compile still writes it and records in the manifest why no engine was
built. Loading runs the engine (``device`` ``cuda``/``cuda:N``), or, with ``device="cpu-ort"``
or ``backend="onnxruntime"``, the same ONNX graph under ONNX Runtime's CPU execution provider,
which is how the graph is verified on machines without TensorRT.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import LlmcError, TargetUnavailableError
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor
from llmc.runtime.target import Capabilities, EmitResult, Target, TargetOption, lowered_ops
from llmc.targets.tensorrt.engine import PRECISIONS

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

MODEL = "target/model.onnx"
DATA = "target/model.onnx.data"
ENGINE = "target/model.engine"
META = "target/tensorrt.json"
BACKENDS = ("tensorrt", "onnxruntime")
_KV_CAPACITY = TargetOption("kv_capacity", int, "tokens per KV slot (default: the profile's past + 1)", minimum=1)


def _cuda_index(device: str) -> int:
    kind, _, index = device.partition(":")
    if kind != "cuda":
        raise TargetUnavailableError(
            f"TensorRT engines run on CUDA devices, not {device!r}",
            hint="use --device cpu-ort (or load option backend='onnxruntime') to run the TensorRT-ready ONNX "
                 "graph under ONNX Runtime's CPU execution provider")
    try:
        return int(index or 0)
    except ValueError as exc:
        raise TargetUnavailableError(f"bad device index in {device!r}") from exc


class TensorRTTarget(Target):
    name = "tensorrt"
    doc = ("TensorRT: a standard-ops ONNX graph (blocked DequantizeLinear INT4/INT8, MatMul/Softmax attention, "
           "explicit past/present KV) built into an engine where TensorRT and a GPU are installed; "
           "--device cpu-ort runs the graph under ONNX Runtime")
    compile_options = (
        *(TargetOption(name, int, f"optimization profile: {name.replace('_', ' ')}")
          for name in ("max_batch", "max_sequence", "max_past", "opt_batch", "opt_sequence", "opt_past")),
        TargetOption("precision", str, "engine precision", PRECISIONS),
        TargetOption("attention", str, "attention: matmul (MatMul/Softmax) or onnx (the opset-23 Attention op)"),
        TargetOption("build_engine", bool, "build the engine where TensorRT and a GPU are present (default on)"),
        TargetOption("workspace_mib", int, "TensorRT builder workspace (MiB)", minimum=1),
    )
    load_options = (
        TargetOption("backend", str, "run the engine (tensorrt) or the graph under ONNX Runtime", BACKENDS),
        _KV_CAPACITY,
    )

    def capabilities(self) -> Capabilities:
        return Capabilities(ops=lowered_ops("add_rms_norm", "swiglu", "rope_attention"),
                            devices=("cuda", "cpu", "cpu-ort"), kv_layout="slots", stores_weights=True)

    def availability(self) -> str | None:
        try:
            import onnx  # noqa: F401
        except ImportError:
            return "onnx is not installed (pip install 'llmc-toolchain[onnx]')"
        return None

    # -- emit ----------------------------------------------------------------------------
    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        reason = self.availability()
        if reason is not None:
            raise TargetUnavailableError(f"target 'tensorrt' is not available here: {reason}")
        import onnx

        from llmc.compiler.config import ModelConfig
        from llmc.targets.onnx.external import ExternalData
        from llmc.targets.onnx.graph import IR_VERSION, OPSET, GraphBuilder
        from llmc.targets.tensorrt.engine import default_profile
        from llmc.targets.tensorrt.lower import TENSORRT_OPS, TrtLowering

        config = ModelConfig.from_dict(module.config)
        profile = default_profile(config, options)
        precision = str(options.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise LlmcError(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        data = ExternalData(writer.path(DATA))
        try:
            graph = GraphBuilder(data)
            lowering = TrtLowering(module, weights, graph, str(options.get("attention", "matmul")))
            lowering.run()
        finally:
            data.close()
        model = graph.model("llmc", f"llmc {module.meta.get('source', '')} (TensorRT-ready, standard ops)")
        del model.opset_import[:]  # standard ops only: no contrib-op domain
        model.opset_import.append(onnx.helper.make_opsetid("", OPSET))
        model_path = writer.path(MODEL)
        model_path.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(model_path), full_check=True)
        ops = Counter(n.op_type for n in model.graph.node)
        foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        unknown = sorted(set(ops) - TENSORRT_OPS)
        if foreign or unknown:
            raise LlmcError(f"internal error: the TensorRT graph uses non-standard op domains {foreign} "
                            f"or ops outside TensorRT's ONNX operator list {unknown}")
        engine, notes = self._engine(model_path, writer, config, profile, precision, options)
        files = [MODEL, DATA, META] + ([ENGINE] if engine.get("built") else [])
        opts = {"device": options.get("device", "cuda"), "opset": OPSET, "ir_version": IR_VERSION,
                "kv_layout": "slots", "profile": profile.to_dict(), "precision": precision, "engine": engine,
                "attention": lowering.attention,
                "linear": {"dequantize_linear": lowering.stats.dequant_linear,
                           "float": lowering.stats.float_linear}}
        meta = {"model": "model.onnx", "data": "model.onnx.data", "options": opts,
                "inputs": [i.name for i in model.graph.input], "onnx_ops": dict(sorted(ops.items())),
                "params": lowering.param_records, "initializers": data.index}
        writer.path(META).write_text(json.dumps(meta, indent=1))
        notes.insert(0, "onnx ops (standard domain only): " + ", ".join(f"{k}={v}" for k, v in sorted(ops.items())))
        return EmitResult(options=opts, files=files, notes=notes)

    def _engine(self, model_path: Any, writer: ArtifactWriter, config: Any, profile: Any, precision: str,
                options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Build the engine when TensorRT and a GPU are here; otherwise record why not."""
        from llmc.targets.tensorrt.engine import build_engine, profile_shapes, runtime_info, tensorrt_missing

        reason = None
        if options.get("build_engine", True) is False:
            reason = "target option build_engine=false"
        else:
            reason = tensorrt_missing()
            if reason is None:
                import torch

                if not torch.cuda.is_available():
                    reason = "no CUDA GPU is visible (TensorRT builds engines for the GPU it runs on)"
        if reason is not None:
            note = (f"warning: no TensorRT engine was built: {reason}. The TensorRT-ready ONNX graph is in {MODEL}; "
                    "build the engine by compiling on a machine with TensorRT and a GPU, or run the graph "
                    "under ONNX Runtime with --device cpu-ort")
            return {"built": False, "reason": reason}, [note]
        device = str(options.get("device") or "cuda")
        index = _cuda_index(device if device.startswith("cuda") else "cuda")
        info = runtime_info(index)
        blob = build_engine(model_path, profile_shapes(profile, config), precision, options.get("workspace_mib"))
        writer.path(ENGINE).write_bytes(blob)
        record = {"built": True, "file": "model.engine", "bytes": len(blob), **info}
        return record, [f"TensorRT {info['tensorrt_version']} engine built for {info['gpu_name']} "
                        f"(compute capability {info['compute_capability']}), precision {precision}"]

    # -- load ----------------------------------------------------------------------------
    def load(self, artifact: Artifact, **options: Any) -> Executor:
        from llmc.targets.tensorrt.engine import Profile
        from llmc.targets.tensorrt.executor import OrtRunner, TrtGraphExecutor

        saved = artifact.target_options
        profile = Profile.from_dict(saved["profile"])
        device = str(options.get("device") or ("cpu-ort" if options.get("backend") == "onnxruntime" else "cuda"))
        backend = options.get("backend") or ("onnxruntime" if device == "cpu-ort" else "tensorrt")
        if backend not in BACKENDS:
            raise LlmcError(f"tensorrt load option backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "onnxruntime":
            if device not in ("cpu", "cpu-ort"):
                raise TargetUnavailableError(f"backend 'onnxruntime' runs the TensorRT-ready graph on the CPU "
                                             f"(device cpu-ort), not {device!r}")
            try:
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                raise TargetUnavailableError(
                    "onnxruntime is not installed (pip install 'llmc-toolchain[onnx]')") from exc
            runner = OrtRunner(artifact.file(MODEL), options.get("threads"))
            return TrtGraphExecutor(runner, artifact.config, "cpu-ort", profile, options.get("kv_capacity"),
                                    backend="onnxruntime")
        return TrtGraphExecutor(self._engine_runner(artifact, device), artifact.config, device, profile,
                                options.get("kv_capacity"))

    def _engine_runner(self, artifact: Artifact, device: str) -> Any:
        from llmc.targets.tensorrt.engine import check_engine_compat, runtime_info, tensorrt_missing
        from llmc.targets.tensorrt.executor import TrtRunner

        index = _cuda_index(device)
        engine = artifact.target_options.get("engine", {})
        if not engine.get("built"):
            raise TargetUnavailableError(
                f"{artifact.path} has no TensorRT engine: it was compiled where {engine.get('reason', 'unknown')}",
                hint="recompile on a machine with TensorRT and a GPU, or run the TensorRT-ready ONNX graph "
                     "under ONNX Runtime with --device cpu-ort")
        missing = tensorrt_missing()
        if missing is not None:
            raise TargetUnavailableError(f"cannot run the TensorRT engine of {artifact.path}: {missing}",
                                         hint="--device cpu-ort runs the ONNX graph under ONNX Runtime instead")
        check_engine_compat(engine, runtime_info(index))
        return TrtRunner(artifact.file(ENGINE).read_bytes(), index)

    def read_weights(self, artifact: Artifact) -> WeightStore:
        """The params, read back from ``model.onnx.data`` (quantized codes un-flipped to llmc's form)."""
        from llmc.targets.onnx.external import read_payload_weights
        from llmc.targets.tensorrt.quant import read_dq_weight

        store: WeightStore = read_payload_weights(artifact.file(META), artifact.file(DATA), read_dq_weight,
                                                  "tensorrt")
        return store
