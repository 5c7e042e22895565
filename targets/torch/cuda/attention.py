"""Decode attention over the torch target's paged KV cache (Triton), RoPE inside, and its torch reference.

The cache of one layer is ``[slots, kv_heads, head_dim]`` with ``slot = block * block_size + offset``; a
sequence's context positions map to slots through its row of the block table. Two kernels per layer:

- :func:`write_kv`: each new token's key (rotated at its position) and value go to its slot;
- :func:`decode_attention`: each sequence's one query (rotated inside the kernel) attends to its whole
  context. A program takes one sequence, one KV head and one of ``splits`` slices of the context (the
  query heads sharing that KV head, GQA, are the rows of one ``tl.dot``); with several slices their
  partial softmax sums are merged by a second kernel (flash-decoding), so a batch of one still spreads
  over the GPU. Context lengths and block tables are read from device memory: the launch is the same
  whatever the lengths, which is what lets a CUDA graph replay it.

RoPE reads float32 ``cos``/``sin`` tables ``[max_position, rotary_dim / 2]`` (:class:`RopeTable`) of either
style (``half``: rotate-half pairs ``d, d + rot/2``; else interleaved pairs ``2i, 2i + 1``); dims past
``rotary_dim`` pass through. Loops over the context are ``while`` loops (their bounds are data), which
Triton's interpreter runs on a CPU as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmc.targets.torch.cuda.triton_dot import INTERPRETING, dot


@dataclass(frozen=True)
class RopeTable:
    """float32 ``cos``/``sin`` ``[max_position, rotary_dim / 2]`` on the device, and the pairing style."""

    cos: torch.Tensor
    sin: torch.Tensor
    rotary_dim: int
    half: bool


@triton.jit
def _rope_parts(d, ROT: tl.constexpr, HALF: tl.constexpr):
    """Per dim ``d``: the partner dim, the sign of its term and the frequency index (dims >= ROT: themselves)."""
    if HALF:
        first = d < ROT // 2
        partner = tl.where(first, d + ROT // 2, d - ROT // 2)
        sign = tl.where(first, -1.0, 1.0)
        freq = tl.where(first, d, d - ROT // 2)
    else:
        even = (d % 2) == 0
        partner = tl.where(even, d + 1, d - 1)
        sign = tl.where(even, -1.0, 1.0)
        freq = d // 2
    rotated = d < ROT
    return tl.where(rotated, partner, d), sign, tl.where(rotated, freq, 0), rotated


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch, stride_rope, D,
                     HAS_ROPE: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    slot = tl.load(slot_ptr + t)
    k_row = k_ptr + t * stride_kt + h * stride_kh
    k = tl.load(k_row + d, mask=d_ok, other=0.0)
    if HAS_ROPE:
        partner, sign, freq, rotated = _rope_parts(d, ROT, HALF)
        pos = tl.load(pos_ptr + t)
        kp = tl.load(k_row + partner, mask=d_ok, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos * stride_rope + freq, mask=d_ok & rotated, other=1.0)
        s = tl.load(sin_ptr + pos * stride_rope + freq, mask=d_ok & rotated, other=0.0)
        kf = k.to(tl.float32)
        k = tl.where(rotated, kf * c + sign * kp * s, kf)
    tl.store(kc_ptr + slot * stride_cs + h * stride_ch + d, k.to(kc_ptr.dtype.element_ty), mask=d_ok)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=d_ok, other=0.0)
    tl.store(vc_ptr + slot * stride_cs + h * stride_ch + d, v.to(vc_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, ctx_ptr, pos_ptr, cos_ptr, sin_ptr,
                             out_ptr, acc_ptr, ml_ptr,
                             stride_qb, stride_qh, stride_cs, stride_ch, stride_tb, stride_rope,
                             stride_ob, stride_oh, stride_ab, stride_ah, stride_as, stride_mb, stride_mh,
                             scale, G, D, block_size,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                             HAS_ROPE: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, IEEE: tl.constexpr,
                             WIDEN: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = sp * chunk
    end = tl.minimum(start + chunk, ctx)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < G
    d_ok = d < D
    heads = kvh * G + g
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if HAS_ROPE:
        partner, sign, freq, rotated = _rope_parts(d, ROT, HALF)
        pos = tl.load(pos_ptr + b)
        qp = tl.load(q_rows + partner[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + pos * stride_rope + freq, mask=d_ok & rotated, other=1.0)
        s = tl.load(sin_ptr + pos * stride_rope + freq, mask=d_ok & rotated, other=0.0)
        q = tl.where(rotated[None, :], q * c[None, :] + sign[None, :] * qp * s[None, :], q)
    q = (q * scale).to(kc_ptr.dtype.element_ty)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    n0 = start
    while n0 < end:
        p = n0 + tl.arange(0, BLOCK_N)
        p_ok = p < end
        blk = tl.load(table_ptr + b * stride_tb + p // block_size, mask=p_ok, other=0)
        slot = blk.to(tl.int64) * block_size + p % block_size
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k), IEEE, WIDEN)
        scores = tl.where(p_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        probs = tl.exp(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(probs, axis=1)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot(probs.to(v.dtype), v, IEEE, WIDEN)
        m = m_new
        n0 += BLOCK_N
    mask = g_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        out = acc / l_sum[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(acc_ptr + b * stride_ab + heads[:, None] * stride_ah + sp * stride_as + d[None, :], acc, mask=mask)
        ml = ml_ptr + b * stride_mb + heads * stride_mh + sp * 2
        tl.store(ml, m, mask=g_ok)
        tl.store(ml + 1, l_sum, mask=g_ok)


@triton.jit
def _merge_splits_kernel(acc_ptr, ml_ptr, out_ptr, stride_ab, stride_ah, stride_as, stride_mb, stride_mh,
                         stride_ob, stride_oh, D, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < SPLITS
    ml = ml_ptr + b * stride_mb + h * stride_mh + s * 2
    m = tl.load(ml, mask=s_ok, other=float("-inf"))
    l_sum = tl.load(ml + 1, mask=s_ok, other=0.0)
    m_all = tl.max(m, axis=0)  # split 0 always holds a key (contexts are never empty)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp(m - m_all), 0.0)
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + s[:, None] * stride_as + d[None, :],
                  mask=s_ok[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _rope_args(rope: RopeTable | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, bool, int, bool]:
    if rope is None:
        return like, like, 0, False, 2, True  # unused pointers
    return rope.cos, rope.sin, rope.cos.stride(0), True, rope.rotary_dim, rope.half


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
             slots: torch.Tensor, rope: RopeTable | None) -> None:
    """Store ``k [T, Hkv, D]`` (rotated at ``positions`` when ``rope``) and ``v`` at ``slots`` of one layer's cache."""
    t, hkv, dim = k.shape
    if k.stride(2) != 1 or v.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("write_kv needs unit-stride head dims and contiguous caches")
    cos, sin, stride_rope, has_rope, rot, half = _rope_args(rope, k_cache)
    _write_kv_kernel[(t, hkv)](k, v, k_cache, v_cache, positions, slots, cos, sin, k.stride(0), k.stride(1),
                               v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), stride_rope, dim,
                               HAS_ROPE=has_rope, HALF=half, ROT=rot, BLOCK_D=max(16, triton.next_power_of_2(dim)))


def decode_splits(batch: int, kv_heads: int, sms: int) -> int:
    """Context slices per (sequence, KV head): enough programs for about two per multiprocessor, at most 32."""
    return max(1, min(32, -(-2 * sms // (batch * kv_heads))))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, positions: torch.Tensor, scale: float, block_size: int,
                     rope: RopeTable | None = None, splits: int = 1, block_n: int = 32) -> torch.Tensor:
    """One query per sequence, ``q [B, Hq, D]`` (rotated at ``positions`` when ``rope``), over each
    sequence's ``context_lens[b]`` cached positions through ``block_tables [B, W]``; returns ``[B, Hq, D]``."""
    batch, hq, dim = q.shape
    hkv = k_cache.shape[1]
    if q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("decode_attention needs unit-stride head dims and contiguous caches")
    group = hq // hkv
    out = torch.empty((batch, hq, dim), dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(dim))
    if splits > 1:
        acc = torch.empty((batch, hq, splits, block_d), dtype=torch.float32, device=q.device)
        ml = torch.empty((batch, hq, splits, 2), dtype=torch.float32, device=q.device)
    else:
        acc = ml = out  # unused
    cos, sin, stride_rope, has_rope, rot, half = _rope_args(rope, k_cache)
    _decode_attention_kernel[(batch, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, positions, cos, sin, out, acc, ml,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), stride_rope,
        out.stride(0), out.stride(1), acc.stride(0), acc.stride(1), acc.stride(2) if splits > 1 else 0,
        ml.stride(0), ml.stride(1), float(scale), group, dim, block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=splits,
        HAS_ROPE=has_rope, HALF=half, ROT=rot, IEEE=q.dtype == torch.float32 and k_cache.dtype == torch.float32,
        WIDEN=INTERPRETING, num_warps=4)
    if splits > 1:
        _merge_splits_kernel[(batch, hq)](acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0),
                                          ml.stride(1), out.stride(0), out.stride(1), dim, SPLITS=splits,
                                          BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d)
    return out


# -- references -----------------------------------------------------------------------------------
def rope_reference(x: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """``x [T, H, D]`` rotated at ``positions`` in float64 (the torch target's :func:`apply_rope`)."""
    from llmc.targets.torch.lower import apply_rope

    cos = rope.cos.double()[positions.long()][:, None, :]
    sin = rope.sin.double()[positions.long()][:, None, :]
    return apply_rope(x.double(), cos, sin, rope.half, rope.rotary_dim)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               tables: list[list[int]], context_lens: list[int], positions: torch.Tensor,
                               scale: float, block_size: int, rope: RopeTable | None = None) -> torch.Tensor:
    """Float64 attention of each sequence's query over its gathered context (GQA by repeating KV heads)."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    qr = rope_reference(q, positions, rope) if rope is not None else q.double()
    outs = []
    for b, (table, n) in enumerate(zip(tables, context_lens, strict=True)):
        pos = torch.arange(n)
        slots = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        keys = k_cache[slots.to(k_cache.device)].double().repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        values = v_cache[slots.to(v_cache.device)].double().repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,nhd->hn", qr[b], keys) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(outs)
