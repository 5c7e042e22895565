"""Fused residual add + RMSNorm (Triton) and its torch reference.

``add_rms_norm(x, residual, w)`` returns ``(rms_norm(x + residual) * w, x + residual)`` in one pass
over the row; the sum is rounded to the activation dtype before it is normalized, as the torch
target's reference does (so the two differ only by float32-vs-activation-dtype arithmetic inside
the norm). One program per row; the row must fit one block (hidden sizes up to 16384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, stride_x, stride_r, stride_o, stride_s, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)  # arithmetic in float32 (also what the interpreter can do with bfloat16)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        total = (xf + r).to(x.dtype)  # rounded to the activation dtype, as the reference's sum is
        tl.store(sum_ptr + row * stride_s + cols, total, mask=mask)
        xf = total.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = xf * tl.rsqrt(var + eps) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, cols = x.shape
    if cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm kernel rows are at most {MAX_HIDDEN} wide, got {cols}")
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm kernel needs rows with unit stride")
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    block = triton.next_power_of_2(cols)
    res = residual if residual is not None else x
    tot = total if total is not None else out
    _rms_norm_kernel[(rows,)](x, res, w, out, tot, cols, x.stride(0), res.stride(0), out.stride(0), tot.stride(0),
                              float(eps), HAS_RES=residual is not None, BLOCK=block,
                              num_warps=min(16, max(1, block // 256)))
    return out, total


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * w`` per row of ``x [rows, hidden]``."""
    return _launch(x, None, w, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * w, x + residual)``."""
    out, total = _launch(x, residual, w, eps)
    assert total is not None
    return out, total


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch target's own RMSNorm (:func:`llmc.targets.torch.lower.rms_norm`)."""
    from llmc.targets.torch.lower import rms_norm as reference

    return reference(x, w, eps)
