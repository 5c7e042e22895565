"""Attention over the torch target's paged KV cache.

A step's sequences share one attention call per layer: :func:`step_context` builds, once per
step, the index tensors every layer reuses (each new token's cache slot, each sequence's
context slots gathered through its block table, a causal, length-aware mask), and
:func:`paged_attention` appends the new keys and values and calls
``scaled_dot_product_attention`` on the padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmc.compiler.errors import LlmcError
from llmc.runtime.executor import StepBatch


@dataclass
class StepContext:
    """Per-step tensors shared by every layer."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    ctx_slots: torch.Tensor  # [B, max_ctx] flat cache slots of each sequence's context
    q_index: torch.Tensor  # [B, max_q] row of each padded query in the flat batch
    out_index: torch.Tensor  # [T] row of each flat token in the padded [B * max_q]
    mask: torch.Tensor  # [B, 1, max_q, max_ctx] True where attention is allowed
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """cos/sin rows of this step's positions, per RoPE setting (:class:`~llmc.targets.torch.lower.RopeTables` key)."""


def step_context(batch: StepBatch, block_size: int, max_position: int, device: torch.device) -> StepContext:
    """The step's index tensors, built with whole-array numpy (no per-token Python)."""
    layout, bs = batch.layout, block_size
    qlens = np.asarray(layout.query_lens, dtype=np.int64)
    clens = np.asarray(layout.context_lens, dtype=np.int64)
    past = clens - qlens
    n_seq, max_q, max_ctx = len(qlens), int(qlens.max()), int(clens.max())
    starts = np.cumsum(qlens) - qlens
    seq_of_row = np.repeat(np.arange(n_seq), qlens)
    offsets = np.arange(int(qlens.sum())) - starts[seq_of_row]  # index of each token in its chunk
    positions = past[seq_of_row] + offsets
    max_blocks = -(-max_ctx // bs)
    tables = np.zeros((n_seq, max_blocks), dtype=np.int64)
    for j, table in enumerate(batch.block_tables):
        if len(table) * bs < clens[j]:
            raise LlmcError(f"sequence {layout.seq_ids[j]} has {len(table)} blocks for {clens[j]} tokens")
        tables[j, : min(len(table), max_blocks)] = table[:max_blocks]
    pos = np.arange(max_ctx)
    ctx_slots = tables[:, pos // bs] * bs + pos % bs  # entries past a sequence's context are masked
    slot_mapping = ctx_slots[seq_of_row, positions]
    q_index = np.zeros((n_seq, max_q), dtype=np.int64)
    q_index[seq_of_row, offsets] = np.arange(len(offsets))
    out_index = seq_of_row * max_q + offsets
    rows = np.arange(max_q)
    causal = pos[None, None, :] <= (past[:, None] + rows[None, :])[:, :, None]
    mask = causal & (rows[None, :, None] < qlens[:, None, None])  # (B, max_q, max_ctx)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return StepContext(t(positions), t(slot_mapping), t(ctx_slots), t(q_index), t(out_index), t(mask[:, None]), {})


def paged_attention(kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    ctx: StepContext, scale: float) -> torch.Tensor:
    """Append ``k``, ``v`` to one layer's cache ``kc``/``vc`` and attend every query of the step."""
    kc.index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
    keys = kc[ctx.ctx_slots].transpose(1, 2)  # (B, Hkv, ctx, D)
    values = vc[ctx.ctx_slots].transpose(1, 2)
    hq, hkv = q.shape[1], k.shape[1]
    decode = ctx.q_index.shape[1] == 1 and ctx.q_index.shape[0] == q.shape[0]  # one query per sequence
    queries = (q[:, None] if decode else q[ctx.q_index]).transpose(1, 2)  # (B, Hq, max_q, D)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=ctx.mask, scale=scale,
                                         enable_gqa=hq != hkv)
    out = out.transpose(1, 2).reshape(-1, hq, q.shape[2])  # (B * max_q, Hq, D)
    return out if decode else out.index_select(0, ctx.out_index)
