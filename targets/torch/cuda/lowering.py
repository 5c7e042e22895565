"""The decode program's op table on CUDA: the torch target's lowering with the Triton kernels in place.

Decode steps (one token per sequence) lower through :data:`CUDA_DECODE_OPS`: RMSNorm and residual +
RMSNorm run :mod:`.norm`'s fused kernel, matmuls on packed int4/int8 weights :mod:`.qmatmul`'s
dequantize-matmul (float weights stay on cuBLAS), and attention writes the new keys and values and
attends through the block tables with RoPE applied inside (:mod:`.attention`). Every other op is the
torch target's own kernel (:data:`~llmc.targets.torch.lower.TORCH_OPS`). Kernels read the step's
:class:`DecodeContext`, whose tensors are a bucket's static buffers: nothing in the program depends on
a value the host reads, so it can be captured in a CUDA graph. Prefill and mixed steps keep the torch
target's programs (SDPA over gathered context), run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmc.compiler.ir.graph import Node
from llmc.compiler.ir.rope import RopeSpec
from llmc.targets.lowering import LoweringTable
from llmc.targets.torch.cuda import attention, norm, qmatmul
from llmc.targets.torch.lower import TORCH_OPS, KernelEnv
from llmc.targets.torch.weights import PackedWeight, linear


@dataclass
class DecodeContext:
    """A decode step's device tensors (a bucket's static buffers), shared by every layer."""

    positions: torch.Tensor  # [B]
    slot_mapping: torch.Tensor  # [B] each new token's cache slot
    block_tables: torch.Tensor  # [B, width]
    context_lens: torch.Tensor  # [B]
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """What the torch target's ``rope`` kernel caches per step (see :class:`~llmc.targets.torch.lower.RopeTables`)."""


@dataclass
class CudaKernelEnv:
    """What the decode kernels read besides their operands."""

    base: KernelEnv
    """The torch target's env (activation dtype, RoPE tables), for the ops kept from its lowering."""
    caches: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    """``layer -> (k_cache, v_cache)``, each ``[slots, kv_heads, head_dim]``."""
    block_size: int
    max_position: int
    splits: Callable[[int], int]
    """Context slices of decode attention for a batch of ``n`` sequences (:func:`~.attention.decode_splits`)."""
    _rope: dict[RopeSpec, attention.RopeTable] = field(default_factory=dict)

    def rope_table(self, spec: RopeSpec, device: torch.device) -> attention.RopeTable:
        """float32 cos/sin ``[max_position, rotary_dim / 2]`` of ``spec`` on ``device`` (made once)."""
        if spec not in self._rope:
            cos, sin = spec.cos_sin(np.arange(self.max_position))
            as32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
            self._rope[spec] = attention.RopeTable(as32(cos), as32(sin), spec.rotary_dim, spec.half)
        return self._rope[spec]


def decode_attend(env: CudaKernelEnv, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  ctx: DecodeContext, scale: float, rope: attention.RopeTable | None) -> torch.Tensor:
    """Write the step's keys (rotated) and values to ``layer``'s cache, attend each sequence's query
    (rotated in the kernel) over its context: ``[B, Hq, D]``."""
    k_cache, v_cache = env.caches(layer)
    attention.write_kv(k, v, k_cache, v_cache, ctx.positions, ctx.slot_mapping, rope)
    return attention.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.positions, scale,
                                      env.block_size, rope, splits=env.splits(q.shape[0]))


Kernel = Callable[[list[Any], DecodeContext], Any]


def _rms_norm(env: CudaKernelEnv, node: Node) -> Kernel:
    eps = float(node.attrs["eps"])  # type: ignore[arg-type]
    return lambda x, c: norm.rms_norm(x[0], x[1], eps)


def _add_rms_norm(env: CudaKernelEnv, node: Node) -> Kernel:
    eps = float(node.attrs["eps"])  # type: ignore[arg-type]
    return lambda x, c: norm.add_rms_norm(x[0], x[1], x[2], eps)


def packed_linear(x: torch.Tensor, weight: Any) -> torch.Tensor:
    """``x @ weight.T``: the dequantize-matmul kernel for a packed weight and up to
    :data:`~.qmatmul.MAX_ROWS` rows, else the torch target's :func:`~llmc.targets.torch.weights.linear`."""
    if isinstance(weight, PackedWeight) and x.dim() == 2 and x.shape[0] <= qmatmul.MAX_ROWS:
        spec = weight.spec
        return qmatmul.qmatmul(x, weight.qdata, weight.scales, weight.offsets, spec.bits, spec.group_size,
                               weight.shape[0])
    return linear(x, weight)


def _attention(env: CudaKernelEnv, node: Node) -> Kernel:
    a = node.attrs
    layer, scale = int(a["layer"]), float(a["scale"])  # type: ignore[call-overload,arg-type]
    if node.op == "attention":  # keys already rotated by a rope op
        return lambda x, c: decode_attend(env, layer, x[0], x[1], x[2], c, scale, None)
    spec = RopeSpec.from_attrs(a)
    tables: dict[torch.device, attention.RopeTable] = {}

    def rope_attention(x: list[Any], ctx: DecodeContext) -> torch.Tensor:
        dev = x[0].device
        if dev not in tables:
            tables[dev] = env.rope_table(spec, dev)
        return decode_attend(env, layer, x[0], x[1], x[2], ctx, scale, tables[dev])

    return rope_attention


def _packed_rope_attention(env: CudaKernelEnv, node: Node) -> Kernel:
    a = node.attrs
    heads, kv_heads, hd = int(a["heads"]), int(a["kv_heads"]), int(a["head_dim"])  # type: ignore[call-overload]
    sizes = [heads * hd, kv_heads * hd, kv_heads * hd]
    attend = _attention(env, node)

    def packed_rope_attention(x: list[Any], ctx: DecodeContext) -> torch.Tensor:
        q, k, v = x[0].split_with_sizes(sizes, dim=-1)
        t = q.shape[0]
        return attend([q.view(t, heads, hd), k.view(t, kv_heads, hd), v.view(t, kv_heads, hd)], ctx)

    return packed_rope_attention


def _kept(op: str) -> Callable[[CudaKernelEnv, Node], Kernel]:
    factory = TORCH_OPS.handler(op)
    return lambda env, node: factory(env.base, node)  # type: ignore[arg-type,return-value]


_OVERRIDES: dict[str, Callable[[CudaKernelEnv, Node], Kernel]] = {
    "rms_norm": _rms_norm,
    "add_rms_norm": _add_rms_norm,
    "linear": lambda env, node: lambda x, c: packed_linear(x[0], x[1]),
    "attention": _attention,
    "rope_attention": _attention,
    "packed_rope_attention": _packed_rope_attention,
}

CUDA_DECODE_OPS: LoweringTable[Callable[[CudaKernelEnv, Node], Kernel]] = LoweringTable(
    "torch-cuda", {op: _OVERRIDES.get(op) or _kept(op) for op in TORCH_OPS})
"""The decode program's lowering on CUDA: op -> factory ``(CudaKernelEnv, node) -> kernel``."""
