"""llmc's C++ CPU quantized GEMV kernel against QuantizedTensor.dequantize() + float matmul."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, pack_codes
from llmc.targets.torch import qkernels
from llmc.targets.torch.weights import PackedWeight


def random_qt(spec: QuantSpec, out: int, inp: int, seed: int, scale_dtype=np.float16) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    groups = -(-inp // spec.group_size)
    codes = rng.integers(0, 2**spec.bits, size=(out, inp), dtype=np.uint8)
    scales = (rng.random((out, groups)) * 0.02 + 0.001).astype(scale_dtype)
    offsets = None if spec.symmetric else (rng.standard_normal((out, groups)) * 0.05).astype(scale_dtype)
    return QuantizedTensor(spec, (out, inp), pack_codes(codes, spec.bits), scales, offsets)


def reference(qt: QuantizedTensor, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ qt.dequantize(np.float32).astype(np.float64).T


@pytest.fixture(scope="module")
def kernels() -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")


CASES = [
    (QuantSpec(4, 32, False), 1536, 576),  # SmolLM2 q/gate/up (Q4_1)
    (QuantSpec(4, 32, False), 576, 1536),  # SmolLM2 down
    (QuantSpec(8, 32, True), 49152, 576),  # SmolLM2 tied head (Q8_0)
    (QuantSpec(4, 32, True), 64, 96),
    (QuantSpec(4, 10, True), 33, 70),  # group not a multiple of 16
    (QuantSpec(4, 64, False), 17, 100),  # ragged last group (36 of 64)
    (QuantSpec(4, 40, True), 19, 90),  # ragged, odd tail inside the vector loop
    (QuantSpec(8, 32, False), 40, 77),  # ragged 8-bit, odd input dim
    (QuantSpec(8, 128, True), 24, 300),
    (QuantSpec(8, 1024, True), 8, 200),  # one (short) group per row: per-channel
    (QuantSpec(4, 2, False), 5, 6),
]


@pytest.mark.parametrize(("spec", "out", "inp"), CASES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_qgemv_matches_dequantized_matmul(kernels, spec: QuantSpec, out: int, inp: int, rows: int) -> None:
    if out * inp > 10**6 and rows == 3:
        pytest.skip("large shape covered by rows 1 and 16")
    qt = random_qt(spec, out, inp, seed=out + inp + rows)
    x = np.random.default_rng(rows).standard_normal((rows, inp)).astype(np.float32)
    pw = PackedWeight(qt, torch.device("cpu"))
    got = qkernels.qgemv(torch.from_numpy(x), pw.qdata, pw.scales.float(),
                         None if pw.offsets is None else pw.offsets.float(), spec.bits, spec.group_size, out)
    want = reference(qt, x)
    assert got.shape == (rows, out) and got.dtype == torch.float32
    scale = np.abs(x).astype(np.float64) @ np.abs(qt.dequantize(np.float32)).astype(np.float64).T
    np.testing.assert_array_less(np.abs(got.numpy() - want), 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 16])
def test_every_row_count_matches(kernels, rows: int) -> None:
    qt = random_qt(QuantSpec(4, 32, False), 48, 64, seed=rows, scale_dtype=np.float32)
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    pw = PackedWeight(qt, torch.device("cpu"))
    got = pw.linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, reference(qt, x), rtol=1e-5, atol=1e-5 * np.abs(reference(qt, x)).max())


def test_packed_weight_uses_kernel_for_few_rows_and_dequant_above(kernels, monkeypatch) -> None:
    qt = random_qt(QuantSpec(4, 32, True), 32, 64, seed=1)
    pw = PackedWeight(qt, torch.device("cpu"))
    calls = []
    real = qkernels.qgemv
    monkeypatch.setattr(qkernels, "qgemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, pw.CPU_KERNEL_MAX_ROWS, pw.CPU_KERNEL_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(pw.linear(x), x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)
    assert calls == [1, pw.CPU_KERNEL_MAX_ROWS]


def test_disabled_kernels_fall_back_to_dequantization(monkeypatch) -> None:
    monkeypatch.setenv("LLMC_NO_CPU_KERNELS", "1")
    assert not qkernels.available()
    qt = random_qt(QuantSpec(8, 32, False), 16, 40, seed=2)
    x = torch.randn(2, 40)
    got = PackedWeight(qt, torch.device("cpu")).linear(x)
    torch.testing.assert_close(got, x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        qkernels.qgemv(x, torch.zeros(16, 40, dtype=torch.uint8), torch.ones(16, 2), None, 8, 32, 16)


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog) -> None:
    monkeypatch.delenv("LLMC_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(qkernels, "_module", None)
    monkeypatch.setattr(qkernels, "_failed", False)
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger=qkernels.__name__):
        assert not qkernels.available()
        assert not qkernels.available()
        qt = random_qt(QuantSpec(4, 16, True), 8, 32, seed=3)
        x = torch.randn(1, 32)
        got = PackedWeight(qt, torch.device("cpu")).linear(x)
    torch.testing.assert_close(got, x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Ninja" in warnings[0].getMessage()


@pytest.mark.parametrize("scheme", ["int4,group=32", "int8"])
def test_executor_auto_uses_the_kernel_and_matches_the_interpreter(kernels, monkeypatch, scheme: str) -> None:
    from llmc.targets.torch.executor import TorchExecutor
    from tests.helpers import SequenceDriver
    from tests.passes.util import interpret_steps, llama_config, random_llama, run_pipeline

    config = llama_config(hidden=64, inter=128, vocab=64, heads=4, kv_heads=2, head_dim=16)
    module, weights = random_llama(config, seed=5)
    module, _ = run_pipeline(module, weights, f"quantize({scheme})")
    want = interpret_steps(module, weights, seed=2)
    calls = []
    real = qkernels.qgemv
    monkeypatch.setattr(qkernels, "qgemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    ex = TorchExecutor(module, weights)
    packed = [w for w in ex.params.values() if isinstance(w, PackedWeight)]
    assert packed and all(w._raw and w.cpu_kernel for w in packed)  # llmc layout kept, no torch kernel layout
    driver = SequenceDriver(ex)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, size=8)
    got = [np.concatenate(driver.step({0: list(ids[:5]), 1: list(ids[5:])}))]
    for _ in range(2):
        nxt = rng.integers(0, config.vocab_size, size=2)
        got.append(np.concatenate(driver.step({0: [int(nxt[0])], 1: [int(nxt[1])]})))
    assert calls
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * max(1.0, np.abs(a).max()))
    for mode in ("dequant", "torch"):  # the other modes keep their meaning
        assert not any(w.cpu_kernel for w in TorchExecutor(module, weights, quant_kernels=mode).params.values()
                       if isinstance(w, PackedWeight))
