"""llmc's int8-activation CPU kernels (targets/torch/qkernels.py) against float64 references.

Every quantized weight form the torch target runs (the GGUF block types and llmc's own int4/int8
groups), on random and on SmolLM2's real tensors, for 1, 7, 32 and 128 input rows, on every kernel
path this CPU has (AMX-INT8, AVX-512 VNNI, AVX2, portable C++). Two properties are checked:

* every path gives the same bits as the portable one (they do the same integer dot products and
  the same float operations in the same order);
* every output is within the int8 activations' error bound of the float64 product of the
  dequantized weight: activation block b (32 values) rounds to ``d_b * q`` with
  ``d_b = max|x| / 127``, off by at most ``d_b / 2`` per value, so an output can move by at most
  ``sum_b d_b / 2 * sum_{i in b} |w_i|``; float32 rounding adds at most about ``(blocks + 4) * 2^-23``
  of the magnitudes summed (scale * code, offset and zero-point terms taken separately).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmc.compiler.ggml_blocks import FORMATS, BlockFormat, decode
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, pack_codes
from llmc.targets.torch import qkernels
from llmc.targets.torch.weights import PackedWeight

ROWS = (1, 7, 32, 128)
TAIL_ROWS = 31
"""16 + 8 + 4 + 2 + 1 rows: every column-pass width of the AVX-512 GEMM in one product."""
SCALE_FIELDS = {  # byte ranges of each block's float16 scale fields (the rest is codes / packed ints)
    "Q4_0": [(0, 2)], "Q4_1": [(0, 2), (2, 4)], "Q5_0": [(0, 2)], "Q5_1": [(0, 2), (2, 4)], "Q8_0": [(0, 2)],
    "Q2_K": [(80, 82), (82, 84)], "Q3_K": [(108, 110)], "Q4_K": [(0, 2), (2, 4)], "Q5_K": [(0, 2), (2, 4)],
    "Q6_K": [(208, 210)],
}


@pytest.fixture(scope="module")
def kernels() -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")


def random_blocks(fmt: BlockFormat, out: int, inp: int, rng: np.random.Generator) -> np.ndarray:
    """Stored blocks with random codes and packed sub-scales and finite float16 scales."""
    raw = rng.integers(0, 256, (out * (inp // fmt.block), fmt.nbytes), dtype=np.uint8)
    for lo, hi in SCALE_FIELDS[fmt.name]:
        scale = (rng.uniform(0.2, 1.0, raw.shape[0]) * (0.004 if fmt.block == 256 else 0.05)).astype(np.float16)
        raw[:, lo:hi] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(out, -1)


def parts(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per element: code, scale, offset (0 if none) and zero point (0 if none), float64 [out, in]."""
    out, inp = qt.shape
    fmt = qt.ggml_format
    if fmt is not None:
        d = decode(qt.qdata, fmt, qt.shape)
        codes, scales, offsets, group, zero = d.codes, d.scales, d.offsets, fmt.sub, fmt.zero or 0
    else:
        codes, scales, offsets, group = qt.unpacked(), qt.scales, qt.offsets, qt.spec.group_size
        zero = 2 ** (qt.spec.bits - 1) if qt.spec.symmetric else 0
    expand = lambda a: np.repeat(a.astype(np.float64), group, axis=1)[:, :inp]
    off = np.zeros((out, inp)) if offsets is None else expand(offsets)
    return codes.astype(np.float64), expand(scales), off, np.full((out, inp), float(zero))


def int8_bound(qt: QuantizedTensor, x: np.ndarray) -> np.ndarray:
    """The error bound of the module docstring, ``[rows, out]``."""
    rows, inp = x.shape
    blocks = -(-inp // 32)
    xp = np.zeros((rows, blocks * 32))
    xp[:, :inp] = np.abs(x)
    d = xp.reshape(rows, blocks, 32).max(-1) / 127  # [rows, blocks]
    w = np.abs(qt.dequantize(np.float32).astype(np.float64))
    wp = np.zeros((qt.shape[0], blocks * 32))
    wp[:, :inp] = w
    rounding_of_x = d * 0.5 * (1 + 1e-5)
    quantization = rounding_of_x @ wp.reshape(-1, blocks, 32).sum(-1).T
    codes, scales, offsets, zero = parts(qt)
    magnitude = np.abs(scales) * (codes + zero) + np.abs(offsets)
    d_elem = np.repeat(d, 32, axis=1)[:, :inp]
    rounding = (blocks + 4) * 2.0**-23 * ((np.abs(x) + d_elem) @ magnitude.T)
    return quantization + rounding + 1e-30


def check_linear(qt: QuantizedTensor, rows: int, seed: int) -> None:
    """Every path: same bits as the portable one, and within :func:`int8_bound` of float64."""
    pw = PackedWeight(qt, torch.device("cpu"))
    assert pw.prepare_cpu_kernel() and pw.kernel is not None
    x = np.random.default_rng(seed).standard_normal((rows, qt.shape[1])).astype(np.float32)
    x[0, : min(40, qt.shape[1])] *= 30.0  # one block with an outlier-sized range
    want = x.astype(np.float64) @ qt.dequantize(np.float32).astype(np.float64).T
    bound = int8_bound(qt, x)
    got = {isa: pw.kernel.linear(torch.from_numpy(x), isa).numpy() for isa in qkernels.isa_paths()}
    for isa, y in got.items():
        assert y.shape == (rows, qt.shape[0]) and y.dtype == np.float32
        np.testing.assert_array_equal(y, got["scalar"], err_msg=f"{isa} differs from the portable path")
        excess = np.abs(y - want) / bound
        assert excess.max() <= 1.0, f"{isa}: error {excess.max():.3f}x the int8 activation bound"
    with qkernels.use_isa(qkernels.isa_paths()[0]):
        np.testing.assert_array_equal(pw.linear(torch.from_numpy(x)).numpy(), got["scalar"])


@pytest.mark.parametrize("rows", (*ROWS, TAIL_ROWS))
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_block_format_matches_the_dequantized_matmul(kernels, name: str, rows: int) -> None:
    fmt = FORMATS[name]
    out, inp = (40, 512) if fmt.block == 256 else (40, 96)  # 40 rows: a partial 16-row tile
    raw = random_blocks(fmt, out, inp, np.random.default_rng(rows + len(name)))
    qt = QuantizedTensor.from_ggml(name, (out, inp), raw)
    expected = gguf_dequantize(raw, GGMLQuantizationType[name]).astype(np.float32)
    assert np.array_equal(qt.dequantize().view(np.uint32), expected.view(np.uint32))
    pw = PackedWeight(qt, torch.device("cpu"))
    assert pw.prepare_cpu_kernel()
    assert np.array_equal(pw.kernel.dequantize().numpy().view(np.uint32), expected.view(np.uint32))  # lossless
    check_linear(qt, rows, seed=rows)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_blocks_quantized_by_gguf_py(kernels, name: str) -> None:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((48, 160)) * rng.uniform(0.01, 2.0, (48, 1))).astype(np.float32)
    w[5, :32] = 0.0  # an all-zero block (scale 0)
    raw = gguf_quantize(w, GGMLQuantizationType[name])
    check_linear(QuantizedTensor.from_ggml(name, (48, 160), raw), rows=7, seed=3)


def _llmc_qt(spec: QuantSpec, out: int, inp: int, seed: int, scale_dtype: type = np.float16) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    groups = -(-inp // spec.group_size)
    codes = rng.integers(0, 2**spec.bits, size=(out, inp), dtype=np.uint8)
    scales = (rng.random((out, groups)) * 0.02 + 0.001).astype(scale_dtype)
    offsets = None if spec.symmetric else (rng.standard_normal((out, groups)) * 0.05).astype(scale_dtype)
    return QuantizedTensor(spec, (out, inp), pack_codes(codes, spec.bits), scales, offsets)


LLMC_CASES = [
    (QuantSpec(4, 32, False), 1536, 576, np.float16),  # SmolLM2's gate/up as int4 g32
    (QuantSpec(4, 32, True), 64, 96, np.float16),
    (QuantSpec(4, 16, False), 48, 64, np.float32),  # a scale per 16 inputs
    (QuantSpec(4, 64, False), 17, 100, np.float16),  # ragged last group, partial block and tile
    (QuantSpec(8, 96, True), 24, 96, np.float32),  # int8 per output channel
    (QuantSpec(8, 32, False), 40, 77, np.float16),  # asymmetric 8-bit, odd input dim
    (QuantSpec(8, 128, True, "bfloat16"), 16, 300, np.float32),  # bfloat16 scales (as float32 in the layout)
]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("spec", "out", "inp", "dtype"), LLMC_CASES)
def test_llmc_groups_match_the_dequantized_matmul(kernels, spec: QuantSpec, out: int, inp: int, dtype: type,
                                                  rows: int) -> None:
    if out * inp > 10**5 and rows == 7:
        pytest.skip("large shape covered by the other row counts")
    qt = _llmc_qt(spec, out, inp, seed=out + inp + rows, scale_dtype=dtype)
    check_linear(qt, rows, seed=rows)


@pytest.mark.network
@pytest.mark.parametrize("rows", ROWS)
def test_smollm2_real_tensors(kernels, smollm2_gguf: Path, rows: int) -> None:
    from llmc.compiler.frontends.gguf_reader import open_gguf
    from llmc.compiler.frontends.gguf_tensors import native_quantized

    tensors = {t.name: t for t in open_gguf(smollm2_gguf).tensors}
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        qt = native_quantized(tensors[name], smollm2_gguf)
        if qt.shape[0] > 4096:  # the 49152-row head: its first 4096 rows
            fmt = qt.ggml_format
            assert fmt is not None
            qt = QuantizedTensor.from_ggml(fmt.name, (4096, qt.shape[1]), qt.qdata[:4096])
        check_linear(qt, rows, seed=rows)


def test_activation_quantization_is_the_same_on_every_path(kernels) -> None:
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((5, 70)).astype(np.float32))
    x[1] = 0.0  # an all-zero row: scale 0
    x[2, 3] = 1e6
    paths = {isa: qkernels.quantize_activations(x, isa) for isa in qkernels.isa_paths()}
    q, d, s = paths["scalar"]
    for isa, (qi, di, si) in paths.items():
        assert np.array_equal(qi, q) and np.array_equal(di, d) and np.array_equal(si, s), isa
    xp = np.zeros((5, 96), dtype=np.float32)
    xp[:, :70] = x.numpy()
    blocks = xp.reshape(5, 3, 32)
    assert np.array_equal(d.astype(np.float32), np.abs(blocks).max(-1) / np.float32(127))
    assert np.abs(q).max() <= 127 and np.array_equal(s, q.sum(-1))
    nonzero = d > 0
    assert np.all(np.abs(q * d[..., None] - blocks)[nonzero] <= (d[..., None] * 0.50001 + 1e-30)[nonzero])
    assert not q[1].any() and not q[:, 2, 70 - 64:].any()  # zero rows and the padding quantize to 0


def _cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo lists (empty off Linux x86-64): an independent check of the extension's
    detection."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return set()
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split(":", 1)[1].split())


def _os_grants_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX-INT8 with AVX-512 VNNI and Linux grants the tile data."""
    if not {"amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= _cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    return libc.syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0


def test_amx_is_the_first_path_where_cpu_and_os_grant_it(kernels) -> None:
    assert ("amx" in qkernels.isa_paths()) == _os_grants_amx()
    if "amx" in qkernels.isa_paths():
        assert qkernels.isa_paths()[:2] == ["amx", "avx512"]


def test_avxvnni_is_listed_where_the_cpu_has_it_just_before_avx2(kernels) -> None:
    paths = qkernels.isa_paths()
    assert ("avxvnni" in paths) == ({"avx2", "fma", "f16c", "avx_vnni"} <= _cpu_flags())
    if "avxvnni" in paths:
        assert paths.index("avxvnni") + 1 == paths.index("avx2")


def test_unknown_or_missing_path_is_refused(kernels) -> None:
    with pytest.raises(ValueError, match="not available"), qkernels.use_isa("sse9"):
        pass
    assert qkernels.isa_paths()[-1] == "scalar" and qkernels.current_isa() == qkernels.isa_paths()[0]


def test_a_built_folder_can_be_chosen_before_loading_only(kernels, tmp_path: Path) -> None:
    """qkernels.load_from (benchmarks/kernels_lockstep_ab.py's children): the loaded build's own folder
    gives it back; a folder without a build, or another build once one is loaded, is refused."""
    here = Path(qkernels.load().__file__).parent
    assert qkernels.load_from(here) is qkernels.load()
    with pytest.raises(FileNotFoundError, match="no built llmc kernels"):
        qkernels.load_from(tmp_path / "llmc_qk_0000000000000000")
    other = tmp_path / "llmc_qk_1111111111111111"
    other.mkdir()
    (other / "llmc_qk_1111111111111111.so").write_bytes(b"")
    with pytest.raises(RuntimeError, match="loaded already"):
        qkernels.load_from(other)


def test_unsupported_groups_dequantize(kernels) -> None:
    qt = _llmc_qt(QuantSpec(4, 10, True), 33, 70, seed=1)
    pw = PackedWeight(qt, torch.device("cpu"))
    assert not pw.kernel_supported() and not pw.prepare_cpu_kernel()
    x = torch.randn(3, 70)
    torch.testing.assert_close(pw.linear(x), x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)


def test_embedding_rows_come_from_the_kernel_layout(kernels) -> None:
    raw = random_blocks(FORMATS["Q8_0"], 40, 64, np.random.default_rng(3))
    qt = QuantizedTensor.from_ggml("Q8_0", (40, 64), raw)
    pw = PackedWeight(qt, torch.device("cpu"))
    assert pw.prepare_cpu_kernel() and pw.qdata.numel() == 0  # the packed copy is dropped
    ids = torch.tensor([0, 17, 39, 17])
    assert torch.equal(pw.dequantize(torch.float32, rows=ids), torch.from_numpy(qt.dequantize()[ids.numpy()]))


def test_disabled_kernels_fall_back_to_dequantization(monkeypatch) -> None:
    monkeypatch.setenv("LLMC_NO_CPU_KERNELS", "1")
    assert not qkernels.available()
    for qt in (_llmc_qt(QuantSpec(8, 32, False), 16, 40, seed=2),
               QuantizedTensor.from_ggml("Q6_K", (16, 256), random_blocks(FORMATS["Q6_K"], 16, 256,
                                                                          np.random.default_rng(0)))):
        pw = PackedWeight(qt, torch.device("cpu"))
        x = torch.randn(2, qt.shape[1])
        assert not pw.prepare_cpu_kernel()
        torch.testing.assert_close(pw.linear(x), x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        qkernels.isa_paths()


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMC_NO_CPU_KERNELS", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(qkernels, "_module", None)
    monkeypatch.setattr(qkernels, "_failed", False)
    from torch.utils import cpp_extension

    def broken(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with caplog.at_level(logging.WARNING, logger=qkernels.__name__):
        assert not qkernels.available()
        assert not qkernels.available()
        qt = _llmc_qt(QuantSpec(4, 16, True), 8, 32, seed=3)
        x = torch.randn(1, 32)
        got = PackedWeight(qt, torch.device("cpu")).linear(x)
    torch.testing.assert_close(got, x @ torch.from_numpy(qt.dequantize()).T, rtol=1e-5, atol=1e-5)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Ninja" in warnings[0].getMessage()


def test_build_cache_is_keyed_by_content_not_path(monkeypatch, tmp_path: Path) -> None:
    name = qkernels.extension_name()
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for path in qkernels._source_files():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(qkernels, "CSRC", copy)
    assert qkernels.extension_name() == name  # another checkout with the same sources shares the build
    (copy / qkernels.SOURCES[1]).write_text((copy / qkernels.SOURCES[1]).read_text() + "\n// changed\n")
    assert qkernels.extension_name() != name


def test_two_builds_at_once_are_serialized(monkeypatch, tmp_path: Path, capsys) -> None:
    from torch.utils import cpp_extension

    events: list[tuple[str, float]] = []
    directory = tmp_path / "llmc_qk_test"

    def fake_load(name: str, sources: list[str], build_directory: str, **kwargs):
        assert all(Path(s).parent == directory / "src" for s in sources)  # built from the cached copy
        events.append(("start", time.perf_counter()))
        time.sleep(0.3)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        events.append(("end", time.perf_counter()))
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_extension, "_import_module_from_library", lambda *a: "reused")
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(qkernels._build("llmc_qk_test", directory)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == ["built", "reused"] and [e for e, _ in events] == ["start", "end"]
    assert "building CPU kernels, once" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int4,group=32", "int8"])
def test_executor_auto_uses_the_kernels_and_matches_the_interpreter(kernels, scheme: str) -> None:
    from llmc.targets.torch.executor import TorchExecutor
    from tests.helpers import SequenceDriver, assert_int8_activation_close
    from tests.passes.util import interpret_steps, llama_config, random_llama, run_pipeline

    config = llama_config(hidden=64, inter=128, vocab=64, heads=4, kv_heads=2, head_dim=16)
    module, weights = random_llama(config, seed=5)
    module, _ = run_pipeline(module, weights, f"quantize({scheme})")
    want = interpret_steps(module, weights, seed=2)
    ex = TorchExecutor(module, weights)
    packed = [w for w in ex.params.values() if isinstance(w, PackedWeight)]
    assert packed and all(w.cpu_kernel for w in packed)
    driver = SequenceDriver(ex)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, size=8)
    got = [np.concatenate(driver.step({0: list(ids[:5]), 1: list(ids[5:])}))]
    for _ in range(2):
        nxt = rng.integers(0, config.vocab_size, size=2)
        got.append(np.concatenate(driver.step({0: [int(nxt[0])], 1: [int(nxt[1])]})))
    matmul = [w for name, w in ex.params.items() if isinstance(w, PackedWeight) and name != "embed"]
    assert matmul and all(w.kernel is not None for w in matmul)  # every quantized matmul ran on llmc's kernels
    for a, b in zip(want, got, strict=True):
        assert_int8_activation_close(b, a)
    for mode in ("dequant", "torch"):  # the other modes keep their meaning
        assert not any(w.cpu_kernel for w in TorchExecutor(module, weights, quant_kernels=mode).params.values()
                       if isinstance(w, PackedWeight))
