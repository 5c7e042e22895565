"""Fused dequantize + matmul over llmc's packed int4/int8 layout (Triton), and its torch reference.

``y = x @ w.T`` where ``w [N, K]`` is a :class:`~llmc.targets.torch.weights.PackedWeight` in the layout of
:mod:`llmc.compiler.packing`: ``qdata`` uint8 ``[N, K]`` (8-bit) or ``[N, K/2]`` (4-bit, the low nibble
holding the even index), ``scales`` and (asymmetric) ``offsets`` ``[N, ceil(K / group)]``. Each weight is
dequantized in float32 exactly as :meth:`PackedWeight.dequantize` does, cast to the activation dtype and
multiplied on the tensor cores (float32 activations: IEEE float32 products), accumulating in float32, so
the result differs from the reference's (dequantize, then ``F.linear``) only by summation order.

A program computes a ``BLOCK_M x BLOCK_N`` tile over a slice of ``K`` (split-K: the slices' float32
partial sums are added afterwards), so a decode step's few rows still spread over every multiprocessor
while each weight byte is read once per row block. For 4-bit weights a tile of ``BLOCK_K`` codes is
``BLOCK_K / 2`` bytes, unpacked into even and odd codes that meet the even and odd columns of ``x``.
Scales and offsets are read per code (any group size, a ragged last group included; they stay in L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmc.targets.torch.cuda.triton_dot import INTERPRETING, dot

MAX_ROWS = 256
"""Above this many rows the executor dequantizes the weight once and calls cuBLAS (prefill)."""


@triton.jit
def _qmm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym, stride_ys,
                group_size, zero_point, K_PER_SPLIT: tl.constexpr,
                BITS: tl.constexpr, ASYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr, PARTIAL: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT  # slices are whole BLOCK_K steps; the last one is cut at K
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        for step in range(0, K_PER_SPLIT, BLOCK_K):  # a constant trip count (software-pipelined)
            kb = (k_start + step) // 2 + tl.arange(0, HALF)  # byte columns
            ke = 2 * kb  # even codes; odd codes are ke + 1 (in the same group: groups are even)
            k_ok = ke < K
            wq = tl.load(q_ptr + rn[None, :] * stride_qn + kb[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            g = ke // group_size
            s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            lo = (wq & 15).to(tl.float32)
            hi = (wq >> 4).to(tl.float32)
            if ASYM:
                off = tl.load(o_ptr + rn[None, :] * stride_sn + g[:, None], mask=k_ok[:, None] & n_ok[None, :],
                              other=0.0).to(tl.float32)
                w_lo = lo * s + off
                w_hi = hi * s + off
            else:
                w_lo = (lo - zero_point) * s
                w_hi = (hi - zero_point) * s
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + ke[None, :] + 1, mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            acc += dot(xe, w_lo.to(xe.dtype), IEEE, WIDEN)
            acc += dot(xo, w_hi.to(xo.dtype), IEEE, WIDEN)
    else:
        for step in range(0, K_PER_SPLIT, BLOCK_K):  # a constant trip count (software-pipelined)
            kk = k_start + step + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            wq = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            g = kk // group_size
            s = tl.load(s_ptr + rn[None, :] * stride_sn + g[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            codes = wq.to(tl.float32)
            if ASYM:
                off = tl.load(o_ptr + rn[None, :] * stride_sn + g[:, None], mask=k_ok[:, None] & n_ok[None, :],
                              other=0.0).to(tl.float32)
                w = codes * s + off
            else:
                w = (codes - zero_point) * s
            xk = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += dot(xk, w.to(xk.dtype), IEEE, WIDEN)
    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :], acc, mask=mask)
    else:
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class QmmConfig:
    """Tile shape, split-K and launch settings of one call."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (1 on a CPU, where the interpreter runs the kernel)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_config(m: int, n: int, k: int, bits: int, sms: int) -> QmmConfig:
    """Tiles for ``m`` rows: 16/32/64-row blocks, 64- or 128-wide column blocks, 128 codes per K step, and
    split-K until the grid has about two programs per multiprocessor (never slices under 4 K steps)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    block_k = 128 if bits == 4 else 64
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    while programs * split * 2 <= 2 * sms and k // (block_k * split * 2) >= 4:
        split *= 2
    return QmmConfig(block_m, block_n, block_k, split, num_warps=4 if block_n == 64 else 8)


def qmatmul(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int,
            group_size: int, n: int, config: QmmConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ w.T`` for the packed ``w [n, K]``; returns ``[M, n]`` in ``x``'s dtype."""
    if x.dim() != 2:
        raise ValueError(f"qmatmul takes 2-D inputs, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if qdata.shape != (n, k // 2 if bits == 4 else k):
        raise ValueError(f"qdata {tuple(qdata.shape)} does not hold a [{n}, {k}] {bits}-bit weight")
    cfg = config or choose_config(m, n, k, bits, sm_count(x.device))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    partial = split > 1
    y = torch.empty((split, m, n) if partial else (m, n), dtype=torch.float32 if partial else x.dtype,
                    device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    offs = offsets if offsets is not None else scales
    _qmm_kernel[grid](x, qdata, scales, offs, y, m, n, k, x.stride(0), qdata.stride(0), scales.stride(0),
                      y.stride(-2), y.stride(0) if partial else 0, group_size, float(2 ** (bits - 1)),
                      K_PER_SPLIT=k_per_split,
                      BITS=bits, ASYM=offsets is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, IEEE=x.dtype == torch.float32, WIDEN=INTERPRETING, PARTIAL=partial,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.sum(0).to(x.dtype) if partial else y


def qmatmul_reference(x: torch.Tensor, weight: object) -> torch.Tensor:
    """The torch target's own path for a packed weight: dequantize in float32, cast, ``F.linear``."""
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype))  # type: ignore[attr-defined]
