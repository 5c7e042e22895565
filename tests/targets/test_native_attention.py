"""The native step program's attention (csrc/qk_ops.h) against float64 attention over the same cache.

A program of two instructions: an embedding whose rows are random queries, keys and values, and
attention over the paged cache. Each step's output is compared with causal softmax attention in
float64 over every position's key and value, rounded to float16 first where the cache is float16
(numpy's ``astype(float16)`` rounds to nearest even, as the kernels' conversion does). What is left
is float32 arithmetic over at most a few hundred terms: 2e-5 relative (L2 per row) bounds it on
every kernel path. Shapes cover grouped heads of 1 to 8 queries per kv head, head sizes that are
not a multiple of 16, chunks of 64 keys, more than 16 query rows, both cache layouts (block-major
needs a block size that is a multiple of 16) and blocks scattered over the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.targets.torch import qkernels


@pytest.fixture(scope="module")
def qk():
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")
    return qkernels.load()


def reference(table: np.ndarray, history: list[list[int]], new: list[int], heads: int, kv_heads: int, hd: int,
              f16: bool) -> np.ndarray:
    """Attention rows of one sequence's `new` tokens after `history` (token ids, one per position)."""
    ids = [*history, *new]
    rows = table[ids].astype(np.float64)
    q = rows[:, : heads * hd].reshape(len(ids), heads, hd) * (1.0 / np.sqrt(hd))
    kv = rows[:, heads * hd :]
    if f16:
        kv = kv.astype(np.float32).astype(np.float16).astype(np.float64)
    k = kv[:, : kv_heads * hd].reshape(len(ids), kv_heads, hd)
    v = kv[:, kv_heads * hd :].reshape(len(ids), kv_heads, hd)
    group = heads // kv_heads
    out = np.zeros((len(new), heads, hd))
    for i in range(len(new)):
        pos = len(history) + i
        for h in range(heads):
            s = k[: pos + 1, h // group] @ q[pos, h]
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[: pos + 1, h // group]
    return out.reshape(len(new), heads * hd)


def attention_program(qk, table: np.ndarray, heads: int, kv_heads: int, hd: int):
    """A program of an embedding (rows of queries, keys and values from `table`) and attention over a
    one-layer paged cache; its logits are the attention rows (one per token)."""
    width = (heads + 2 * kv_heads) * hd
    prog = qk.NativeProgram(1, kv_heads, hd)
    x, out = prog.buffer(width, False), prog.buffer(heads * hd, False)
    prog.embed((x, 0, width), torch.from_numpy(table))
    prog.attention((out, 0, heads * hd), (x, 0, heads * hd), (x, heads * hd, kv_heads * hd),
                   (x, (heads + kv_heads) * hd, kv_heads * hd), 0, heads, kv_heads, hd, 1.0 / np.sqrt(hd), -1, 0, False)
    prog.set_logits((out, 0, heads * hd))
    return prog


def run_steps(qk, heads: int, kv_heads: int, hd: int, block_size: int, block_major: bool, dtype: torch.dtype,
              steps: list[list[int]], isa: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab, width = 512, (heads + 2 * kv_heads) * hd
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    table[:, heads * hd : (heads + kv_heads) * hd] *= 2.0  # keys large enough for peaked softmaxes
    prog = attention_program(qk, table, heads, kv_heads, hd)
    seqs = len(steps[0])
    max_len = sum(max(step) for step in steps) + 1
    per_seq = -(-max_len // block_size)
    blocks = rng.permutation(seqs * per_seq + 3)  # scattered, some never used
    tables = torch.from_numpy(blocks[: seqs * per_seq].reshape(seqs, per_seq).astype(np.int64))
    shape = (1, len(blocks) * block_size, kv_heads, hd)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    history: list[list[int]] = [[] for _ in range(seqs)]
    for step in steps:
        new = [[int(t) for t in rng.integers(0, vocab, n)] for n in step]
        lens = [len(h) + n for h, n in zip(history, step, strict=True)]
        ids = torch.tensor([t for seq in new for t in seq], dtype=torch.int64)
        got = prog.run(ids, torch.tensor(step), torch.tensor(lens), tables, torch.arange(len(ids)), k_cache, v_cache,
                       block_size, 2, block_major, isa).numpy()
        row = 0
        for s, seq_new in enumerate(new):
            want = reference(table, history[s], seq_new, heads, kv_heads, hd, dtype == torch.float16)
            for i, w in enumerate(want):
                err = np.linalg.norm(got[row + i] - w) / np.linalg.norm(w)
                assert err <= 2e-5, (s, i, err)
            row += len(seq_new)
            history[s].extend(seq_new)


SHAPES = [(9, 3, 64), (8, 1, 16), (4, 4, 80), (6, 2, 24), (8, 2, 128), (16, 2, 32), (12, 6, 16)]
"""(heads, kv heads, head size): SmolLM2's grouping, multi-query, no grouping, a 24-wide head (a
16-lane part and an 8-value tail), Llama's 128, 8 queries per kv head (two passes of heads) and 2 (a
prompt's rows three at a time on AVX-512; SmolLM2's go two at a time, no grouping's six)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("layout", [(16, True), (32, True), (16, False), (8, False)], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_matches_float64_on_every_kernel_path(qk, shape, layout, dtype) -> None:
    heads, kv_heads, hd = shape
    block_size, block_major = layout
    # ragged prefills, decode, chunks after a past, and 8 new rows across a 64-key chunk boundary
    steps = [[70, 5, 1, 17], [1, 1, 1, 1], [1, 40, 1, 2], [1, 14, 1, 1], [1, 8, 1, 1]]
    for isa in qkernels.isa_paths():
        run_steps(qk, heads, kv_heads, hd, block_size, block_major, dtype, steps, isa, seed=hd + heads)


def test_float16_conversion_is_the_same_on_every_path(qk) -> None:
    """The cache's float16 bits: round to nearest even, overflow to inf, subnormals, signed zeros, NaN
    kept quiet: torch's conversion and every kernel path agree bit for bit."""
    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, -65520.0, 1e6, np.inf, -np.inf, 6.1035156e-05,
                      6.1e-05, 5.96e-08, 2.98e-08, 2.9802322e-08, 1e-9, 1.0 + 2**-11, 1.0 + 3 * 2**-11, -2.5e-7],
                     dtype=np.float32)
    values = np.concatenate([edges, rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-9, 6, 1000),
                             rng.uniform(-1, 1, 37).astype(np.float32)])
    x = torch.from_numpy(values)
    want = x.to(torch.float16).view(torch.int16)
    for isa in qkernels.isa_paths():
        assert torch.equal(qk.to_half_bits(x, isa), want), isa
    nan_bits = {isa: int(qk.to_half_bits(torch.tensor([float("nan")]), isa)[0]) & 0xFFFF
                for isa in qkernels.isa_paths()}
    assert len(set(nan_bits.values())) == 1 and (nan_bits["scalar"] & 0x7E00) == 0x7E00, nan_bits


def test_logits_rows_must_cover_a_row_per_token_view(qk) -> None:
    """A program whose logits view has a row per token (no gather) copies every row out: a step asking
    for fewer logits rows is refused with a clear error, not written past the logits tensor."""
    heads, kv_heads, hd, bs = 2, 1, 16, 16
    table = np.random.default_rng(0).standard_normal((8, (heads + 2 * kv_heads) * hd)).astype(np.float32)
    prog = attention_program(qk, table, heads, kv_heads, hd)
    cache = torch.zeros((1, 2 * bs, kv_heads, hd))
    args = (torch.arange(4), torch.tensor([4]), torch.tensor([4]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="logits_rows must list every row"):
        prog.run(*args, torch.tensor([3]), cache, cache.clone(), bs, 1, True)
    assert prog.run(*args, torch.arange(4), cache, cache.clone(), bs, 1, True).shape == (4, heads * hd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", [(9, 3, 16), (4, 4, 16)], ids=str)
def test_a_later_rows_value_never_reaches_an_earlier_row(qk, shape, dtype) -> None:
    """A prompt's rows are attended several at a time (their query vectors together): a value that only
    a later row may see, even an infinite one, leaves every earlier row's output as if it were absent."""
    heads, kv_heads, hd = shape
    rng = np.random.default_rng(5)
    vocab, width, bs, n = 16, (heads + 2 * kv_heads) * hd, 16, 12
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    table[vocab - 1, (heads + kv_heads) * hd :] = np.inf  # token vocab-1's values
    prog = attention_program(qk, table, heads, kv_heads, hd)
    ids = [int(t) for t in rng.integers(0, vocab - 1, n - 1)] + [vocab - 1]
    shape_kv = (1, 2 * bs, kv_heads, hd)
    want = reference(table, [], ids[:-1], heads, kv_heads, hd, dtype == torch.float16)
    for isa in qkernels.isa_paths():
        k_cache, v_cache = torch.zeros(shape_kv, dtype=dtype), torch.zeros(shape_kv, dtype=dtype)
        got = prog.run(torch.tensor(ids), torch.tensor([n]), torch.tensor([n]), torch.tensor([[0, 1]]),
                       torch.arange(n), k_cache, v_cache, bs, 2, True, isa).numpy()
        assert np.isfinite(got[: n - 1]).all(), isa
        for i in range(n - 1):
            assert np.linalg.norm(got[i] - want[i]) / np.linalg.norm(want[i]) <= 2e-5, (isa, i)
