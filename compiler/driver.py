"""The compiler driver: source file -> front end -> IR -> passes -> target -> artifact."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.frontends.llama import build_module, declare_params
from llmc.compiler.frontends.source import ModelSource, load_source
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, WeightStore
from llmc.errors import LlmcError
from llmc.passes.base import PassContext
from llmc.passes.manager import PassManager
from llmc.passes.pipelines import parse_pipeline, pipeline_for
from llmc.runtime.artifact import ArtifactWriter, sha256_file
from llmc.targets.registry import get_target

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
# --quant: "none" keeps weights as loaded (GGUF blocks dequantized to float32); "native" keeps
# GGUF Q8_0/Q4_0/Q4_1 blocks as QuantizedTensor bit for bit; fp16..int4 are the quantization passes.
QUANT_MODES = ("none", "fp16", "bf16", "int8", "int4", "native")


@dataclass
class CompileOptions:
    """Everything ``llmc compile`` can be told."""

    target: str = "torch"
    dtype: str | None = None
    opt_level: int = 2
    passes: str | None = None
    dump_ir: Path | None = None
    device: str = "cpu"
    target_options: dict[str, Any] = field(default_factory=dict)
    quant: str = "none"
    group_size: int = 32
    sym: bool | None = None
    """Symmetric quantization (None: int8 symmetric, int4 asymmetric)."""
    calib_file: Path | None = None
    quant_override: tuple[str, ...] = ()
    eval_file: Path | None = None
    max_ppl_increase: str | float | None = None
    auto_escalate: bool = False

    def __post_init__(self) -> None:
        if self.quant not in QUANT_MODES:
            raise LlmcError(f"unknown --quant {self.quant!r}; choose from {', '.join(QUANT_MODES)}")

    def manifest_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dump_ir"] = str(self.dump_ir) if self.dump_ir else None
        for key in ("calib_file", "eval_file"):
            data[key] = str(data[key]) if data[key] else None
        data["quant_override"] = list(self.quant_override)
        return data


def cast_weights(weights: WeightStore, dtype: str) -> None:
    """Cast every float matrix to ``dtype`` (norm vectors stay float32; quantized stay)."""
    if dtype not in WEIGHT_DTYPES:
        raise LlmcError(f"unknown weight dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
    target = NUMPY_DTYPES[dtype]
    for name in list(weights):
        w = weights[name]
        if isinstance(w, QuantizedTensor):
            continue
        arr = np.asarray(w)
        wanted = target if arr.ndim == 2 else NUMPY_DTYPES["float32"]
        if arr.dtype != wanted:
            weights[name] = arr.astype(np.float32).astype(wanted)


def frontend_module(source: ModelSource, dtype: str | None) -> Module:
    """The unoptimized module for a loaded source (after the weight dtype cast)."""
    if dtype is not None:
        cast_weights(source.weights, dtype)
    else:
        for name in list(source.weights):  # numpy math needs no bfloat16 vectors
            w = source.weights[name]
            if not isinstance(w, QuantizedTensor) and np.asarray(w).ndim == 1:
                source.weights[name] = np.asarray(w).astype(np.float32)
    params = declare_params(source.config, source.weights, str(source.path))
    return build_module(source.config, params, meta={"source": str(source.path), **source.meta})


def optimize(module: Module, weights: WeightStore, options: CompileOptions, target_ops: frozenset[str],
             target_name: str, preferred: list[str] | None = None) -> tuple[Module, PassManager]:
    """Run ``--passes`` or the ``O<n>`` pipeline (``preferred``: the target's own list for that level)."""
    passes = (parse_pipeline(options.passes) if options.passes
              else pipeline_for(options.opt_level, target_ops, preferred))
    manager = PassManager(passes, verify=True, dump_dir=options.dump_ir)
    ctx = PassContext(weights=weights, target_ops=target_ops, target_name=target_name, options=options.target_options)
    return manager.run(module, ctx), manager


def compile_model(source_path: str | Path, out: str | Path, options: CompileOptions) -> Path:
    """Compile a model file or folder into an artifact directory; returns its path."""
    target = get_target(options.target)
    source = load_source(source_path, native_quant=options.quant == "native")
    if options.quant == "native" and source.kind != "gguf":
        raise LlmcError(f"{source_path}: --quant native keeps GGUF quant blocks; this source is {source.kind!r}, "
                        "not a GGUF file")
    module = frontend_module(source, options.dtype)
    module, manager = optimize(module, source.weights, options, target.fused_ops, target.name,
                               target.preferred_passes(options.opt_level))
    quant_manifest: dict[str, Any] = {}
    if options.quant != "none" or options.eval_file is not None:
        from llmc.compiler.quantization import quantize_and_gate  # last pass: after the fusions

        quant = quantize_and_gate(module, source.weights, options, source.tokenizer, target.fused_ops, target.name)
        module = quant.module
        manager.records.extend(quant.records)
        quant_manifest = quant.manifest
    out = Path(out)
    with ArtifactWriter(out) as writer:
        if target.stores_weights:  # the payload holds them (e.g. ONNX external data): no second copy
            writer.record_weights(module, source.weights)
        else:
            writer.write_weights(module, source.weights)
        writer.write_ir(module)
        writer.write_tokenizer(source.tokenizer)
        emitted = target.emit(module, source.weights, writer, {"device": options.device, **options.target_options})
        manifest = {
            "source": {
                "kind": source.kind,
                "path": str(source.path),
                "files": {str(p.name): sha256_file(p) for p in source.files},
            },
            "model": source.config.to_dict(),
            "target": {"name": target.name, "options": emitted.options, "files": emitted.files,
                       "notes": emitted.notes, "stores_weights": target.stores_weights},
            "compile_options": options.manifest_dict(),
            "pipeline": {
                "opt_level": options.opt_level,
                "custom": options.passes,
                "passes": [r.to_dict() for r in manager.records],
            },
            "entries": _entries(module),
            "kv_cache": {
                "num_layers": source.config.num_layers,
                "num_kv_heads": source.config.num_kv_heads,
                "head_dim": source.config.head_dim,
                "layout": "slots" if target.name in ("onnx", "tensorrt") else "paged",
            },
            "op_counts": module.op_counts(),
            "tokenizer": source.tokenizer is not None,
            **quant_manifest,
        }
        return writer.finish(manifest)


def _entries(module: Module) -> dict[str, Any]:
    return {
        fn.name: {
            "inputs": {str(n.attrs["name"]): str(n.out_types[0]) for n in fn.inputs},
            "outputs": {name: str(v.type) for name, v in fn.outputs.items()},
        }
        for fn in module
    }
