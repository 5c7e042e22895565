"""The compile driver: source file -> front end -> IR -> passes (quantization last) -> target -> artifact.

The top layer: it may use every package, and only the CLI and the public API import it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.errors import LlmcError, UnsupportedError
from llmc.compiler.frontends.gguf_tensors import adapt_for_target
from llmc.compiler.frontends.llama import build_module, declare_params
from llmc.compiler.frontends.source import ModelSource, is_gguf_file, load_source
from llmc.compiler.ir.graph import Module
from llmc.compiler.progress import step
from llmc.compiler.quant_modes import PASS_MODES, default_quant, quant_mode
from llmc.compiler.token_ids import read_tokens
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, WeightStore
from llmc.gate import AccuracyGate, describe_weights
from llmc.passes.base import Pass, PassContext
from llmc.passes.manager import PassManager
from llmc.passes.pipelines import parse_pipeline, pipeline_for
from llmc.passes.quant_plan import QuantPlan
from llmc.passes.quantize import QuantizePass
from llmc.runtime.artifact import ArtifactWriter, sha256_file
from llmc.runtime.registry import get_target
from llmc.runtime.target import Capabilities, Target, check_options

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
    quant: str | None = None
    """A :data:`~llmc.compiler.quant_modes.QUANT_MODES` name; None: ``native`` for a GGUF source,
    ``none`` otherwise (:func:`~llmc.compiler.quant_modes.default_quant`)."""
    group_size: int = 32
    sym: bool | None = None
    """Symmetric quantization (None: int8 symmetric, int4 asymmetric)."""
    calib_file: Path | None = None
    quant_override: tuple[str, ...] = ()
    eval_file: Path | None = None
    max_ppl_increase: str | float | None = None
    auto_escalate: bool = False

    def __post_init__(self) -> None:
        if self.quant is not None:
            quant_mode(self.quant)

    def for_source(self, source_path: str | Path) -> CompileOptions:
        """These options with ``quant`` resolved for ``source_path`` (see :attr:`quant`)."""
        if self.quant is not None:
            return self
        return replace(self, quant=default_quant(is_gguf_file(source_path)))

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


def quantize_pass(options: CompileOptions, tokenizer: LlmcTokenizer | None, keep_inputs: bool) -> QuantizePass | None:
    """The ``quantize`` pass ``--quant`` asks for (None for ``none``/``native``); option errors come first."""
    if options.quant not in PASS_MODES:
        if options.calib_file is not None:
            raise LlmcError(f"--calib-file applies to int4 quantization (AWQ scales), not --quant {options.quant}")
        return None
    plan = QuantPlan.build(options.quant, options.group_size, options.sym, None, list(options.quant_override))
    calib = read_tokens(options.calib_file, tokenizer, "calibration file") if options.calib_file else None
    if calib is not None and plan.main.bits != 4 and not any(s.bits == 4 for _, s in plan.overrides):
        raise LlmcError("--calib-file applies to int4 quantization (AWQ scales); use it with --quant int4")
    return QuantizePass(plan=plan, calib_ids=calib, keep_inputs=keep_inputs)


def pipeline_passes(options: CompileOptions, target_ops: frozenset[str], preferred: list[str] | None = None,
                    quantize: Pass | None = None, rewrites: list[str] | None = None) -> list[Pass]:
    """``--passes`` or the ``O<n>`` pipeline (``preferred``: the target's own list for that level),
    then the target's ``rewrites`` (:meth:`Target.rewrites <llmc.runtime.target.Target.rewrites>`),
    then ``quantize`` last, so fused weights are quantized as one matrix."""
    passes = (parse_pipeline(options.passes) if options.passes
              else pipeline_for(options.opt_level, target_ops, preferred))
    if rewrites:
        passes += parse_pipeline(",".join(rewrites))
    return passes + ([quantize] if quantize is not None else [])


def optimize(module: Module, weights: WeightStore, options: CompileOptions, target_ops: frozenset[str],
             target_name: str, preferred: list[str] | None = None,
             quantize: Pass | None = None, rewrites: list[str] | None = None) -> tuple[Module, PassManager]:
    """Run the pipeline of :func:`pipeline_passes` with verification after every pass."""
    manager = PassManager(pipeline_passes(options, target_ops, preferred, quantize, rewrites), verify=True,
                          dump_dir=options.dump_ir)
    ctx = PassContext(weights=weights, target_ops=target_ops, target_name=target_name, options=options.target_options)
    return manager.run(module, ctx), manager


def check_target_options(options: CompileOptions, target: Target) -> dict[str, Any]:
    """Refuse a device, quantization mode or target option the target does not take, before any work;
    returns the target options converted to their declared types (:attr:`Target.compile_options`)."""
    caps = target.capabilities()
    caps.device_kind(options.device)
    if options.quant not in caps.quant_modes:
        raise UnsupportedError(f"target {target.name!r} does not lower --quant {options.quant} weights; it takes "
                               f"{', '.join(sorted(caps.quant_modes))}")
    return check_options(target, options.target_options, "compile")


def adapt_blocks(weights: WeightStore, caps: Capabilities, target: str) -> list[str]:
    """Convert kept GGUF blocks the target does not run as stored (:attr:`Capabilities.gguf_blocks`);
    returns one note per converted block type."""
    converted: dict[str, list[str]] = {}
    for name in list(weights):
        adapted, note = adapt_for_target(weights[name], caps.gguf_blocks)
        if adapted is not weights[name]:
            weights[name] = adapted
        if note is not None:
            converted.setdefault(note.split()[0], []).append(f"{name}: {note}")
    notes = []
    for kind, items in converted.items():
        notes.append(f"target {target!r} does not run {kind} blocks: {len(items)} tensors dequantized to float32 "
                     f"({'; '.join(items[:3])}{'; ...' if len(items) > 3 else ''})")
        log.warning("%s", notes[-1])
    return notes


def dequantized_note(source: ModelSource, weights: WeightStore, matrices: list[str]) -> str | None:
    """``--quant none`` on a GGUF with quantized tensors: how much bigger the float32 weights are."""
    if source.kind != "gguf":
        return None
    stored = source.files[0].stat().st_size
    dense = sum(np.asarray(weights[n]).nbytes for n in matrices if not isinstance(weights[n], QuantizedTensor))
    if dense <= stored * 1.2:
        return None
    return (f"--quant none dequantizes {source.path.name}'s quantized blocks to float32: {dense / 1e6:.0f} MB of "
            f"matrices from a {stored / 1e6:.0f} MB file (without --quant the blocks are kept as stored)")


def compile_model(source_path: str | Path, out: str | Path, options: CompileOptions | None = None) -> Path:
    """Compile a model file or folder into an artifact directory (``options``: the defaults when
    None: torch, CPU, -O2, a GGUF's blocks kept as stored); returns its path."""
    options = (options or CompileOptions()).for_source(source_path)
    target = get_target(options.target)
    caps = target.capabilities()
    options = replace(options, target_options=check_target_options(options, target))
    inputs = [Path(p) for p in (source_path, options.calib_file, options.eval_file, options.dump_ir) if p is not None]
    writer = ArtifactWriter(out, inputs=inputs)
    writer.check()  # an output that is not llmc's own is refused before any work
    with step(f"reading {Path(source_path).name}"):
        source = load_source(source_path, native_quant=options.quant == "native")
    read_tensors(source)
    if options.quant == "native" and source.kind != "gguf":
        raise LlmcError(f"{source_path}: --quant native keeps GGUF quant blocks; this source is {source.kind!r}, "
                        "not a GGUF file")
    block_notes = adapt_blocks(source.weights, caps, target.name) if options.quant == "native" else []
    gate = AccuracyGate.from_options(options.eval_file, options.max_ppl_increase, options.auto_escalate,
                                     source.tokenizer)
    quantize = quantize_pass(options, source.tokenizer, keep_inputs=gate is not None)
    module = frontend_module(source, options.dtype)
    rewrites = target.rewrites(options.opt_level)
    module, manager = optimize(module, source.weights, options, caps.fused_ops, target.name,
                               target.preferred_passes(options.opt_level), quantize, rewrites)
    extra: dict[str, Any] = {}
    matrices = [n for n in sorted(module.referenced_params()) if module.params[n].type.rank == 2]
    if quantize is not None:
        extra["quantization"] = {
            "mode": options.quant,
            "order": "last pass, after the optimization pipeline",
            "plan": quantize.plan.describe(),
            "calibration": None if quantize.calib_ids is None else {
                "file": str(options.calib_file), "tokens": len(quantize.calib_ids), "method": "awq",
                **quantize.awq_stats},
            "params": describe_weights(source.weights, matrices),
        }
    elif options.quant == "native":
        extra["quantization"] = {"mode": "native", "params": describe_weights(source.weights, matrices),
                                 "notes": block_notes}
    elif options.quant == "none" and (note := dequantized_note(source, source.weights, matrices)) is not None:
        log.warning("%s", note)
        extra["quantization"] = {"mode": "none", "notes": [note]}
    if gate is not None:
        reference = quantize.input_weights if quantize is not None else {}
        outcome = gate.run(module, source.weights, reference, quantize)
        module = outcome.module
        extra["quality"] = outcome.quality
        if outcome.escalated and "quantization" in extra:
            extra["quantization"]["params"] = describe_weights(source.weights, matrices)
            extra["quantization"]["escalated"] = outcome.escalated
    with writer:
        if caps.stores_weights:  # the payload holds them (e.g. ONNX external data): no second copy
            writer.record_weights(module, source.weights)
        else:
            with step("writing weights"):
                writer.write_weights(module, source.weights)
        writer.write_ir(module)
        writer.write_tokenizer(source.tokenizer)
        with step(f"{target.name} target"):
            emitted = target.emit(module, source.weights, writer,
                                  {"device": options.device, **options.target_options})
        with step("source checksums"):
            source_files = {str(p.name): sha256_file(p) for p in source.files}
        manifest = {
            "source": {
                "kind": source.kind,
                "path": str(source.path),
                "files": source_files,
            },
            "model": source.config.to_dict(),
            "target": {"name": target.name, "options": emitted.options, "files": emitted.files,
                       "notes": emitted.notes, "stores_weights": caps.stores_weights},
            "compile_options": options.manifest_dict(),
            "pipeline": {
                "opt_level": options.opt_level,
                "custom": options.passes,
                "target_rewrites": rewrites,
                "passes": [r.to_dict() for r in manager.records],
            },
            "entries": _entries(module),
            "kv_cache": {
                "num_layers": source.config.num_layers,
                "num_kv_heads": source.config.num_kv_heads,
                "head_dim": source.config.head_dim,
                "layout": caps.kv_layout,
            },
            "op_counts": module.op_counts(),
            "tokenizer": source.tokenizer is not None,
            **extra,
        }
        with step("artifact checksums"):
            return writer.finish(manifest)


def read_tensors(source: ModelSource) -> None:
    """Load (and dequantize where asked) every tensor now, one counted step, rather than on first use."""
    with step("reading tensors", total=len(source.weights)) as progress:
        for name in list(source.weights):
            source.weights[name]  # a lazy weight loads on access
            progress.advance(name)


def _entries(module: Module) -> dict[str, Any]:
    return {
        fn.name: {
            "inputs": {str(n.attrs["name"]): str(n.out_types[0]) for n in fn.inputs},
            "outputs": {name: str(v.type) for name, v in fn.outputs.items()},
        }
        for fn in module
    }
