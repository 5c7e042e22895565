"""The CUDA path's Triton kernels against the torch references (fresh random inputs each, poisoned outputs).

Tolerances: float32 inputs through IEEE float32 products land near 1e-7 relative (the references run in
float64); bfloat16 activations carry their 2^-8 rounding (relative errors of a few 1e-3); the interpreter
rounds float32 to bfloat16 by truncation, a GPU to nearest, so bfloat16 checks allow one bfloat16 step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.targets.torch_cuda.device import DEVICE, TRITON_MISSING  # conftest.py set TRITON_INTERPRET already

pytest.importorskip("triton", reason=TRITON_MISSING)

from llmc.compiler.ir.rope import RopeSpec
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.packing import pack_codes
from llmc.compiler.weights import QuantizedTensor
from llmc.targets.torch.cuda import attention, norm, qmatmul
from llmc.targets.torch.weights import PackedWeight

DEV = torch.device(DEVICE)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "non-finite output"
    return float((got.double() - want.double()).norm() / want.double().norm())


def random_packed(rng: np.random.Generator, n: int, k: int, bits: int, group: int, symmetric: bool,
                  scale_dtype: str = "float16") -> PackedWeight:
    groups = -(-k // group)
    codes = rng.integers(0, 2**bits, (n, k)).astype(np.uint8)
    scales = (rng.random((n, groups)) * 0.02 + 0.002).astype(scale_dtype)
    offsets = None if symmetric else (rng.standard_normal((n, groups)) * 0.05).astype(scale_dtype)
    qt = QuantizedTensor(QuantSpec(bits, group, symmetric, scale_dtype), (n, k), pack_codes(codes, bits), scales,
                         offsets)
    return PackedWeight(qt, DEV)


# -- fused residual + RMSNorm ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [64, 300, 2048])
def test_rms_norm_and_add_rms_norm(dtype: torch.dtype, cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(7, cols, generator=g).to(dtype).to(DEV)
    res = torch.randn(7, cols, generator=g).to(dtype).to(DEV)
    w = (torch.rand(cols, generator=g) + 0.5).to(dtype).to(DEV)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    got = norm.rms_norm(x, w, 1e-5)
    assert rel(got, norm.rms_norm_reference(x.double(), w.double(), 1e-5)) < tol
    out, total = norm.add_rms_norm(x, res, w, 1e-5)
    want_total = x + res
    if dtype == torch.float32:
        assert torch.equal(total, want_total)
    else:  # one bfloat16 step at most (the interpreter truncates)
        assert ((total.float() - want_total.float()).abs() <= want_total.float().abs() * 2**-7 + 1e-30).all()
    assert rel(out, norm.rms_norm_reference(total.double(), w.double(), 1e-5)) < tol


def test_rms_norm_on_a_strided_view() -> None:
    x = torch.randn(4, 2 * 96).to(DEV)[:, :96]  # rows of a wider tensor
    w = torch.rand(96).to(DEV) + 0.5
    assert rel(norm.rms_norm(x, w, 1e-6), norm.rms_norm_reference(x.double(), w.double(), 1e-6)) < 1e-6


# -- fused dequantize + matmul --------------------------------------------------------------------
QMM_CASES = [  # (bits, group, symmetric, rows, out, in)
    (4, 32, False, 1, 96, 256),  # int4 asymmetric g32 (GGUF Q4_1, llmc's int4)
    (4, 32, True, 3, 70, 96),  # int4 symmetric (Q4_0), ragged column block
    (4, 64, False, 17, 64, 320),
    (4, 48, False, 2, 40, 100),  # ragged last group, in not a multiple of the K step
    (8, 32, True, 5, 72, 200),  # int8 g32 (Q8_0)
    (8, 1024, True, 33, 48, 160),  # int8 per channel (one group per row)
    (8, 32, False, 64, 40, 96),
]


@pytest.mark.parametrize(("bits", "group", "symmetric", "m", "n", "k"), QMM_CASES)
@pytest.mark.parametrize("split", [1, 2, 3])
def test_qmatmul_float32_matches_dequantize_then_linear(bits: int, group: int, symmetric: bool, m: int, n: int,
                                                        k: int, split: int) -> None:
    rng = np.random.default_rng(bits * 1000 + group + m + split)
    w = random_packed(rng, n, k, bits, group, symmetric)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(DEV)
    base = qmatmul.choose_config(m, n, k, bits, 1)
    cfg = qmatmul.QmmConfig(base.block_m, 32, 64, split)
    got = qmatmul.qmatmul(x, w.qdata, w.scales, w.offsets, bits, group, n, cfg)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert rel(got, qmatmul.qmatmul_reference(x.double(), w)) < 1e-6


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, True)])
def test_qmatmul_bfloat16_activations(bits: int, symmetric: bool) -> None:
    rng = np.random.default_rng(bits)
    w = random_packed(rng, 128, 256, bits, 32, symmetric, scale_dtype="float32")
    x = torch.from_numpy(rng.standard_normal((4, 256)).astype(np.float32)).to(DEV).to(torch.bfloat16)
    got = qmatmul.qmatmul(x, w.qdata, w.scales, w.offsets, bits, 32, 128)
    assert got.dtype == torch.bfloat16
    # the reference multiplies the same bfloat16 weights in float64: left is the output's bfloat16 rounding
    want = torch.nn.functional.linear(x.double(), w.dequantize(torch.bfloat16).double())
    assert rel(got, want) < 8e-3


def test_choose_config_splits_k_for_few_rows_on_many_multiprocessors() -> None:
    one = qmatmul.choose_config(1, 2048, 2048, 4, sms=132)
    assert one.block_m == 16 and one.split_k > 1
    assert qmatmul.choose_config(1, 2048, 2048, 4, sms=1).split_k == 1
    big = qmatmul.choose_config(256, 8192, 2048, 4, sms=132)
    assert big.block_m == 64 and big.split_k == 1
    for m in (1, 8, 64, 256):  # slices never fall under 4 K steps
        cfg = qmatmul.choose_config(m, 128256, 2048, 8, sms=132)
        assert 2048 // (cfg.block_k * cfg.split_k) >= 4


# -- KV writes and paged decode attention ---------------------------------------------------------
def _rope(style: str, rot: int) -> attention.RopeTable:
    cos, sin = RopeSpec(10000.0, style, rot).cos_sin(np.arange(512))
    return attention.RopeTable(torch.from_numpy(cos).float().to(DEV), torch.from_numpy(sin).float().to(DEV), rot,
                               style == "half")


ATTN_CASES = [  # (style, rotary_dim, head_dim, q heads, kv heads, dtype)
    ("half", 64, 64, 8, 2, torch.float32),  # Llama: GQA group 4
    ("half", 64, 64, 32, 8, torch.bfloat16),  # Llama-3.2-1B's heads
    ("interleaved", 16, 24, 4, 4, torch.float32),  # interleaved pairs, partial rotary, head_dim not a power of 2
    ("half", 8, 8, 8, 4, torch.float32),  # stories260k: head_dim 8 (padded to 16 in the kernel)
    (None, 0, 32, 6, 2, torch.float16),  # no RoPE (the IR's plain attention)
]


@pytest.mark.parametrize(("style", "rot", "dim", "hq", "hkv", "dtype"), ATTN_CASES)
@pytest.mark.parametrize("splits", [1, 3])
def test_write_kv_and_decode_attention(style: str | None, rot: int, dim: int, hq: int, hkv: int, dtype: torch.dtype,
                                       splits: int) -> None:
    g = torch.Generator().manual_seed(hq * 100 + dim + splits)
    bs, nblocks = 4, 100
    rope = _rope(style, rot) if style else None
    kc = torch.randn(nblocks * bs, hkv, dim, generator=g).to(dtype).to(DEV)
    vc = torch.randn(nblocks * bs, hkv, dim, generator=g).to(dtype).to(DEV)
    ctx = [1, 5, 17, 64, 70]  # one position only, within a block, across blocks, many
    perm = torch.randperm(nblocks, generator=g).tolist()
    width = 20
    tables = [perm[i * 18 : i * 18 + -(-c // bs)] for i, c in enumerate(ctx)]
    table_t = torch.full((len(ctx), width), 7777, dtype=torch.int32)  # entries past a context are never read
    for i, t in enumerate(tables):
        table_t[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    pos = torch.tensor([c - 1 for c in ctx]).to(DEV)
    # the new keys/values arrive as strided views of one fused projection, as in the model
    fused = torch.randn(len(ctx), (hq + 2 * hkv) * dim, generator=g).to(dtype).to(DEV)
    q = fused[:, : hq * dim].view(len(ctx), hq, dim)
    k = fused[:, hq * dim : (hq + hkv) * dim].view(len(ctx), hkv, dim)
    v = fused[:, (hq + hkv) * dim :].view(len(ctx), hkv, dim)
    slots = torch.tensor([tables[b][(c - 1) // bs] * bs + (c - 1) % bs for b, c in enumerate(ctx)]).to(DEV)
    untouched = kc.clone()
    attention.write_kv(k, v, kc, vc, pos, slots, rope)
    want_k = attention.rope_reference(k, pos, rope) if rope else k.double()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel(kc[slots], want_k) < tol and torch.equal(vc[slots], v)
    others = torch.ones(kc.shape[0], dtype=torch.bool)
    others[slots.cpu()] = False
    assert torch.equal(kc[others.to(DEV)], untouched[others.to(DEV)])  # nothing else written
    got = attention.decode_attention(q, kc, vc, table_t.to(DEV), torch.tensor(ctx, dtype=torch.int32).to(DEV), pos,
                                     dim**-0.5, bs, rope, splits=splits, block_n=16)
    want = attention.decode_attention_reference(q, kc, vc, tables, ctx, pos, dim**-0.5, bs, rope)
    assert got.shape == (len(ctx), hq, dim) and got.dtype == dtype
    assert rel(got, want) < tol


def test_decode_splits_fill_the_gpu() -> None:
    assert attention.decode_splits(1, 8, 132) == 32  # capped
    assert attention.decode_splits(16, 8, 132) == 3
    assert attention.decode_splits(256, 8, 132) == 1
