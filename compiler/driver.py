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

    def manifest_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dump_ir"] = str(self.dump_ir) if self.dump_ir else None
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
             target_name: str) -> tuple[Module, PassManager]:
    passes = parse_pipeline(options.passes) if options.passes else pipeline_for(options.opt_level, target_ops)
    manager = PassManager(passes, verify=True, dump_dir=options.dump_ir)
    ctx = PassContext(weights=weights, target_ops=target_ops, target_name=target_name, options=options.target_options)
    return manager.run(module, ctx), manager


def compile_model(source_path: str | Path, out: str | Path, options: CompileOptions) -> Path:
    """Compile a model file or folder into an artifact directory; returns its path."""
    target = get_target(options.target)
    source = load_source(source_path)
    module = frontend_module(source, options.dtype)
    module, manager = optimize(module, source.weights, options, target.fused_ops, target.name)
    out = Path(out)
    with ArtifactWriter(out) as writer:
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
                       "notes": emitted.notes},
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
                "layout": "paged" if target.name != "onnx" else "slots",
            },
            "op_counts": module.op_counts(),
            "tokenizer": source.tokenizer is not None,
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
