"""Helpers for the tvm target tests: tiny modules built from numpy weights, artifacts without a source."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig, RopeScaling
from llmc.compiler.frontends.llama import build_module, declare_params, param_shapes
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, WeightStore, pack_codes
from llmc.driver import CompileOptions, optimize
from llmc.runtime.artifact import Artifact, ArtifactWriter
from llmc.runtime.registry import get_target


def tiny_config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 8, "max_position": 64, "rope_theta": 10000.0,
    }
    values.update(overrides)
    return ModelConfig(**values)


def random_weights(config: ModelConfig, seed: int = 0) -> WeightStore:
    rng = np.random.default_rng(seed)
    store = WeightStore()
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:
            store[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            store[name] = rng.normal(0.0, 0.15, shape).astype(np.float32)
    return store


def quantize(weight: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest group quantization of ``weight [out, in]`` into llmc's quantized form."""
    out, inp = weight.shape
    groups = -(-inp // spec.group_size)
    padded = np.zeros((out, groups * spec.group_size), np.float32)
    padded[:, :inp] = weight
    g = padded.reshape(out, groups, spec.group_size)
    top = 2**spec.bits - 1
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = np.maximum(np.abs(g).max(-1), 1e-8) / (half - 1)
        codes = np.clip(np.round(g / scale[..., None]) + half, 0, top)
        offsets = None
    else:
        lo, hi = g.min(-1), g.max(-1)
        scale = np.maximum(hi - lo, 1e-8) / top
        codes = np.clip(np.round((g - lo[..., None]) / scale[..., None]), 0, top)
        offsets = lo
    codes = codes.reshape(out, -1)[:, :inp].astype(np.uint8)
    dtype = NUMPY_DTYPES[spec.scale_dtype]
    return QuantizedTensor(spec, (out, inp), pack_codes(codes, spec.bits), scale.astype(dtype),
                           None if offsets is None else offsets.astype(dtype))


def tiny_module(config: ModelConfig, weights: WeightStore) -> Module:
    params = declare_params(config, weights, "test")
    return build_module(config, params)


def target_rewritten(module: Module, weights: WeightStore, target_name: str = "tvm") -> Module:
    """``module`` after only the target's own rewrites (``Target.rewrites``: the form its lowering expects)."""
    return _rewrite(module, weights, target_name)[0]


def _rewrite(module: Module, weights: WeightStore, target_name: str) -> tuple[Module, list[dict[str, Any]]]:
    target = get_target(target_name)
    caps = target.capabilities()
    rewritten, manager = optimize(module, weights, CompileOptions(target=target_name, opt_level=0), caps.fused_ops,
                                  target_name, rewrites=target.rewrites(0))
    return rewritten, [r.to_dict() for r in manager.records]


def write_artifact(module: Module, weights: WeightStore, out: Path, target_name: str = "tvm",
                   **options: Any) -> Artifact:
    """An artifact for ``module`` written straight by a target (tvm by default; no source file, no
    passes but the target's own rewrites)."""
    target = get_target(target_name)
    module, records = _rewrite(module, weights, target_name)
    with ArtifactWriter(out) as writer:
        writer.write_weights(module, weights)
        writer.write_ir(module)
        result = target.emit(module, weights, writer, {"device": "cpu", **options})
        path = writer.finish({"source": {"kind": "test", "path": "tests/targets/tvm_util.py"},
                              "model": dict(module.config),
                              "target": {"name": target_name, "options": result.options, "files": result.files,
                                         "notes": result.notes},
                              "pipeline": {"opt_level": 0, "custom": None, "passes": records}})
    return Artifact.load(path)


LLAMA3 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=16)



def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a ``llmc synth`` preset (a real model's shapes), with overrides
    (e.g. fewer ``num_layers``)."""
    import json
    import tempfile

    from llmc.compiler.frontends.hf import parse_config
    from llmc.synth import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(get_preset(preset).hf_config))
        config = parse_config(path)
    return replace(config, **overrides)


def zero_weights(config: ModelConfig, dtype: str = "float16") -> WeightStore:
    """Weights of ``config``'s shapes, all zero (``np.zeros`` pages are not touched until written, so a
    real model's shapes cost no memory): for compiles, whose kernels depend on shapes and dtypes only."""
    store = WeightStore()
    for name, shape in param_shapes(config).items():
        store[name] = np.zeros(shape, np.float32 if len(shape) == 1 else NUMPY_DTYPES[dtype])
    return store


def compiled_module(config: ModelConfig, weights: WeightStore, quant: str = "none", target_name: str = "tvm") -> Module:
    """``config``'s module through the driver's pipeline for ``target_name`` as ``llmc compile`` runs it
    (the target's O2 passes, its rewrites, then ``--quant`` last)."""
    from llmc.driver import quantize_pass

    target = get_target(target_name)
    options = CompileOptions(target=target_name, quant=quant)
    module, _ = optimize(tiny_module(config, weights), weights, options, target.capabilities().fused_ops,
                         target_name, target.preferred_passes(2), quantize_pass(options, None, False),
                         target.rewrites(2))
    return module


class LibraryWriter:
    """The one part of :class:`ArtifactWriter` a target's ``emit`` uses (``path``), writing into a
    folder: for compiles checked by their target payload alone (no weights, no manifest)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        p = self.root / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def emit_payload(module: Module, root: Path, target_name: str = "tvm", **options: Any) -> dict[str, Any]:
    """Emit ``module`` with ``target_name`` into ``root`` (``options``: its target options, device
    included); returns the tvm payload (``target/tvm/tvm.json``) and the emit result's notes under
    ``notes``."""
    import json

    result = get_target(target_name).emit(module, WeightStore(), LibraryWriter(root), options)
    payload = json.loads((root / "target" / "tvm" / "tvm.json").read_text())
    return {**payload, "notes": result.notes}
