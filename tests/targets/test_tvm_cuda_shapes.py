"""Real models' shapes cross-compile for CUDA (no GPU needed): Llama-3.2-1B and -3B.

Kernels depend on shapes and dtypes only, so the compiles use zero weights (untouched pages, no
memory) through the same pipeline as ``llmc compile`` (O2, the target's rewrites, ``--quant``).
Identical layers share their kernels, so a model reduced to two layers with the real per-layer
shapes and the real vocab (128256) compiles the same kernels as the full one; the full-size
compiles are marked slow. Every kernel must have compiled sm_90a code in the exported library
(:func:`llmc.targets.tvm.target._check_device_code` refuses the build otherwise).

The first test is the regression of the TIR CSE failure with Llama 3 RoPE scaling
(:mod:`llmc.targets.tvm.tirfix`): it needs no nvcc.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "1")
pytest.importorskip("tvm", reason="apache-tvm is not installed (the tvm extra: pip install -e '.[tvm]')")

from llmc.errors import TargetUnavailableError
from llmc.targets.tvm.devcode import cuda_sm, device_images
from llmc.targets.tvm.target import CUDA_BUCKETS
from llmc.targets.tvm.tirfix import inline_let_expressions
from tests.targets.tvm_util import compiled_module, emit_payload, preset_config, zero_weights

pytestmark = pytest.mark.tvm

LLAMA3_TVM = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192.0}
H100 = "nvidia/nvidia-h100"


def test_llama3_rope_prefill_kernel_builds_for_cuda_after_let_inlining() -> None:
    """TVM's ragged prefill kernel, float32, llama3 RoPE: TIR CSE breaks it unless its Lets are inlined."""
    import tvm
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged
    from tvm.target import Target

    target = Target({"kind": "cuda", "arch": "sm_90a"})
    kernel = _attention_prefill_ragged(8, 32, 64, 64, "float32", LLAMA3_TVM, target)
    with target, pytest.raises(Exception, match="used before definition"):  # TVM 0.27's bug, as found
        tvm.tirx.build(tvm.IRModule({"main": kernel}), target=target)
    mod, changed = inline_let_expressions(tvm.IRModule({"main": kernel}))
    assert changed == ["main"] and "T.Let" not in mod.script()
    with target:
        tvm.tirx.build(mod, target=target)  # CUDA source codegen: no nvcc involved


def test_let_inlining_keeps_values() -> None:
    """A PrimFunc with nested expression Lets computes the same on llvm before and after inlining."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func
    def f(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")) -> None:
        for i in range(64):
            u = T.float32()
            w = T.float32()
            b[i] = T.Let(T.Let(w * u + w, where={w: T.max(T.float32(0), T.min(T.float32(1), u - T.float32(1)))}),
                         where={u: a[i] * T.float32(3)})

    inlined, changed = inline_let_expressions(tvm.IRModule({"main": f}))
    assert changed == ["main"] and "T.Let" not in inlined.script()
    x = np.random.default_rng(0).uniform(-1.0, 2.0, 64).astype(np.float32)
    outs = []
    for mod in (tvm.IRModule({"main": f}), inlined):
        b = tvm.runtime.tensor(np.full(64, np.nan, np.float32))
        tvm.tirx.build(mod, target="llvm")["main"](tvm.runtime.tensor(x), b)
        outs.append(b.numpy())
    u = x * np.float32(3)
    w = np.clip(u - np.float32(1), 0, 1)
    np.testing.assert_allclose(outs[0], w * u + w, rtol=1e-6)
    np.testing.assert_array_equal(outs[1], outs[0])


def _cross_compile(tmp_path: Path, preset: str, quant: str = "none", buckets: tuple[int, ...] = CUDA_BUCKETS,
                   **config: int) -> dict:
    """Compile ``preset`` (``config`` overrides its shapes) for sm_90a with decode ``buckets``; check the
    device code, the kernels and that each bucket's decode step is one CUDA graph."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: cannot compile CUDA device code")
    cfg = preset_config(preset, **config)
    module = compiled_module(cfg, zero_weights(cfg), quant)
    try:
        payload = emit_payload(module, tmp_path / "lib", device="cuda", arch=H100,
                               decode_buckets=",".join(map(str, buckets)))
    except TargetUnavailableError as exc:
        pytest.skip(f"CUDA toolchain unusable here: {exc}")
    kernels = payload["device_code"]["kernels"]
    images = device_images(tmp_path / "lib" / "target" / "tvm" / "model.so")
    functions = {f for im in images for f in im.functions}
    assert images and all(cuda_sm(im.flags) == 90 for im in images)
    assert not [k for k in kernels if k not in functions]
    for kernel in ("batch_prefill_paged_kv_kernel", "batch_decode_paged_kv_kernel", "fused_rope_kernel"):
        assert kernel in kernels
    # a static decode function per batch bucket, each captured as one CUDA graph
    assert payload["decode_buckets"] == list(buckets)
    assert {f"decode_b{b}" for b in buckets} <= set(payload["functions"])
    layers = cfg.num_layers
    for b in buckets:  # the whole step is one graph, paged attention included; the logits matmul is not
        cov = payload["graph_coverage"][f"decode_b{b}"]
        assert cov["graphs"] == 1 and cov["captured_kernel_calls"] >= 10 * layers, cov  # 11 a layer at O2
        assert len(cov["outside"]) == 1 and "matmul" in cov["outside"][0], cov
    if preset.startswith("llama-3"):
        assert payload["rope"]["rope_scaling"]["rope_type"] == "llama3"
    return payload


def test_llama_3_2_1b_two_layers_fp16_and_int4_cross_compile(tmp_path: Path) -> None:
    """Llama-3.2-1B's layer shapes (hidden 2048, 32/8 heads of 64, intermediate 8192) and vocab 128256;
    two decode buckets here (each bucket compiles its own kernels: all nine are the slow tests')."""
    fp16 = _cross_compile(tmp_path / "fp16", "llama-3.2-1b", buckets=(1, 4), num_layers=2)
    int4 = _cross_compile(tmp_path / "int4", "llama-3.2-1b", "int4", buckets=(1, 4), num_layers=2)
    assert any("dequantize_matmul" in k for k in int4["device_code"]["kernels"])
    assert not any("dequantize_matmul" in k for k in fp16["device_code"]["kernels"])


def test_llama_3_2_3b_two_layers_cross_compile(tmp_path: Path) -> None:
    """Llama-3.2-3B's layer shapes: hidden 3072, 24/8 heads of 128, intermediate 8192."""
    _cross_compile(tmp_path, "llama-3.2-3b", buckets=(1,), num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_smollm2_every_bucket_cross_compiles(tmp_path: Path, quant: str) -> None:
    """SmolLM2-135M's shapes (hidden 576, 9/3 heads of 64, vocab 49152) with CUDA's nine decode buckets."""
    _cross_compile(tmp_path, "smollm2-135m", quant, num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "quant"), [("llama-3.2-1b", "none"), ("llama-3.2-1b", "int8"),
                                               ("llama-3.2-3b", "none")])
def test_full_size_cross_compile(tmp_path: Path, preset: str, quant: str) -> None:
    payload = _cross_compile(tmp_path, preset, quant)
    layers = preset_config(preset).num_layers
    assert len([s for s in payload["param_slots"] if s[0].startswith(f"layers.{layers - 1}.")]) >= 4
