"""Quantized weights on the torch target: low-precision CPU kernels and on-the-fly dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.compiler.ir.types import QuantSpec
from llmc.errors import LlmcError
from llmc.passes.quant_rtn import per_channel_group, quantize_rtn
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.weights import PackedWeight
from tests.helpers import SequenceDriver, assert_int8_activation_close
from tests.passes.util import executor_steps, interpret_steps, llama_config, random_llama, run_pipeline


def _packed(spec: QuantSpec, out: int, inp: int, seed: int = 0) -> tuple[PackedWeight, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((out, inp)).astype(np.float32) * 0.1
    qt = quantize_rtn(w, spec)
    pw = PackedWeight(qt, torch.device("cpu"))
    pw.cpu_kernel = False  # torch's kernels and the dequantize path (llmc's are tests/targets/test_qkernels.py)
    return pw, qt.dequantize(np.float32)


@pytest.mark.parametrize(
    ("spec", "out", "inp", "kernel"),
    [
        (QuantSpec(8, per_channel_group(96), True), 48, 96, "int8pack"),
        (QuantSpec(4, 32, True), 64, 96, "int4pack"),
        (QuantSpec(4, 32, False), 64, 128, "int4pack"),
        (QuantSpec(4, 64, False), 32, 128, "int4pack"),
        (QuantSpec(4, 32, False), 40, 96, "dequant"),  # rows not a multiple of 16
        (QuantSpec(4, 32, False), 64, 80, "dequant"),  # ragged last group
        (QuantSpec(8, 32, True), 64, 96, "dequant"),  # int8 group-wise (e.g. GGUF Q8_0)
    ],
)
def test_kernels_match_the_dequantized_weight(spec: QuantSpec, out: int, inp: int, kernel: str) -> None:
    pw, deq = _packed(spec, out, inp)
    assert pw.kernel_name() == kernel
    before = pw.resident_bytes
    pw.prepare_linear()
    for rows in (1, 5, 20):  # int8: the kernel up to INT8PACK_MAX_ROWS, one dequantization above
        x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
        got = pw.linear(x).numpy()
        want = x.numpy().astype(np.float64) @ deq.astype(np.float64).T
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    if kernel == "int8pack":
        assert pw.resident_bytes <= before + 4 * out  # int8 codes + float32 scales, no float weight
    assert pw.resident_bytes < out * inp * 4 / 3


@pytest.mark.parametrize(
    "pipeline",
    ["quantize(int8)", "quantize(int4,group=16)", "quantize(int4,group=16,sym=true)", "quantize(fp16)",
     "quantize(bf16)", "fuse-qkv,fuse-gate-up,fuse-add-rmsnorm,dce,quantize(int4,group=16)"],
)
@pytest.mark.parametrize("kernels", ["dequant", "auto"])
def test_executor_matches_interpreter_on_the_same_quantized_weights(pipeline: str, kernels: str) -> None:
    config = llama_config(hidden=64, inter=96, vocab=64, heads=4, kv_heads=2, head_dim=16)
    module, weights = random_llama(config, seed=2)
    module, _ = run_pipeline(module, weights, pipeline)
    want = interpret_steps(module, weights, seed=4)
    executor = TorchExecutor(module, weights, quant_kernels=kernels)
    got = executor_steps(executor, config.vocab_size, seed=4)
    quantized = any(isinstance(w, PackedWeight) for w in executor.params.values())
    for a, b in zip(want, got, strict=True):
        if kernels == "auto" and quantized:  # llmc's CPU kernels: int8 activations
            assert_int8_activation_close(b, a)
        else:
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * max(1.0, np.abs(a).max()))


def test_int4_model_uses_kernels_and_less_memory() -> None:
    config = llama_config(hidden=64, inter=128, vocab=64, heads=4, kv_heads=2, head_dim=16)
    module, weights = random_llama(config)
    fp32 = TorchExecutor(module, weights)
    dense = sum(t.numel() * t.element_size() for t in fp32.params.values() if isinstance(t, torch.Tensor))
    module, _ = run_pipeline(module, weights, "quantize(int4,group=32)")
    auto = TorchExecutor(module, weights)  # the default policy never holds two layouts of a weight
    for w in auto.params.values():
        if isinstance(w, PackedWeight):
            assert w.resident_bytes <= w.shape[0] * w.shape[1] * 1.2
    ex = TorchExecutor(module, weights, quant_kernels="torch")
    packed = [w for w in ex.params.values() if isinstance(w, PackedWeight)]
    assert {w.kernel_name() for w in packed} >= {"int4pack", "int8pack"}
    resident = sum(w.resident_bytes for w in packed) + sum(
        t.numel() * t.element_size() for t in ex.params.values() if isinstance(t, torch.Tensor))
    assert resident < dense / 4


@pytest.mark.parametrize("scheme", ["int8", "int4,group=16"])
def test_tied_head_shares_int8_kernel_codes_with_the_embedding(scheme: str) -> None:
    config = llama_config(hidden=64, inter=96, vocab=64, heads=4, kv_heads=2, head_dim=16, tied=True)
    module, weights = random_llama(config, seed=3)
    module, _ = run_pipeline(module, weights, f"share-tied-weights,dce,quantize({scheme})")
    assert "lm_head" not in module.referenced_params()
    executor = TorchExecutor(module, weights)
    embed = executor.params["embed"]
    assert isinstance(embed, PackedWeight) and embed.kernel_name() == "int8pack"
    assert embed.resident_bytes < 64 * 64 * 1.2  # int8 codes once, no float copy, no second layout
    want = interpret_steps(module, weights, seed=1)
    got = executor_steps(executor, config.vocab_size, seed=1)
    for a, b in zip(want, got, strict=True):
        assert_int8_activation_close(b, a)


def test_dequant_option_skips_the_torch_kernels_with_the_same_results() -> None:
    config = llama_config(hidden=64, inter=128, vocab=64, heads=4, kv_heads=2, head_dim=16)
    module, weights = random_llama(config)
    module, _ = run_pipeline(module, weights, "quantize(int4,group=32)")
    outs = []
    for kernels in ("torch", "dequant"):
        ex = TorchExecutor(module, weights, quant_kernels=kernels)
        names = {w.kernel_name() for w in ex.params.values() if isinstance(w, PackedWeight) and not w._raw}
        assert names == ({"int4pack", "int8pack"} if kernels == "torch" else set())
        outs.append(SequenceDriver(ex).step({0: [1, 5, 9, 3]})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-4 * np.abs(outs[1]).max())
    with pytest.raises(LlmcError, match="quant_kernels"):
        TorchExecutor(module, weights, quant_kernels="fast")
