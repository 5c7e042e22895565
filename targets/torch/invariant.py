"""Batch-invariant execution for the torch executor's deterministic mode.

A batched matmul's rounding can depend on how many rows it multiplies (gemv for one row,
other blockings for more), and a padded softmax's on how far it is padded, so a token's
logits could change with whatever else shares its step. Here every result a token row gets
depends only on that row, its position and the cache contents:

- the flattened rows of a step run in consecutive tiles of exactly ``ROW_TILE`` rows (the
  last one padded with dummy rows whose keys and values are never written), each tile
  through the whole program, so every matmul and elementwise kernel sees the same shapes;
  later tiles see the cache entries of earlier ones, which keeps prefill causal;
- attention scores are elementwise dot products over the head dim, the softmax subtracts the
  row's exact maximum, and sums over keys are taken per ``KEY_TILE`` keys and accumulated tile
  after tile in order: masked keys contribute exact zeros, so the result does not depend on
  how far the tile's longest context pads the others (the context is padded to whole tiles, so
  elementwise kernels never hit a scalar tail);
- the head runs on all rows of a tile and the wanted rows are picked afterwards.

The price is speed (row tiles run one after another, and attention uses elementwise kernels
rather than a fused attention kernel); the gain is that greedy outputs do not depend on
batching, chunking, prefix-cache hits or preemption. Verified on this machine's CPU kernels by
the engine tests (tests/runtime/test_engine_torch.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from llmc.compiler.errors import LlmcError

if TYPE_CHECKING:
    from llmc.runtime.executor import StepBatch
    from llmc.targets.torch.attention import StepContext
    from llmc.targets.torch.executor import TorchExecutor

ROW_TILE = 16
KEY_TILE = 32
CHUNK = 32 * KEY_TILE  # keys per slice of the value sum (bounds the (rows, keys, heads, dim) product)


def invariant_step(executor: TorchExecutor, batch: StepBatch) -> np.ndarray:
    """:meth:`TorchExecutor.step` in deterministic mode: logits ``[len(logits_rows), vocab]``."""
    layout, bs = batch.layout, executor.block_size
    positions = np.asarray(layout.positions(), dtype=np.int64)
    seq_of_row = np.repeat(np.arange(len(layout.seq_ids)), layout.query_lens)
    tables = []
    for j, table in enumerate(batch.block_tables):
        if len(table) * bs < layout.context_lens[j]:
            raise LlmcError(f"sequence {layout.seq_ids[j]} has {len(table)} blocks for {layout.context_lens[j]} tokens")
        tables.append(np.asarray(table, dtype=np.int64))
    wanted = {int(r): i for i, r in enumerate(batch.logits_rows)}
    out = np.empty((len(batch.logits_rows), executor.config.vocab_size), dtype=np.float32)
    for t0 in range(0, layout.num_tokens, ROW_TILE):
        rows = np.arange(t0, min(t0 + ROW_TILE, layout.num_tokens))
        picks = [(wanted[r], i) for i, r in enumerate(rows.tolist()) if r in wanted]
        logits = _run_tile(executor, batch.token_ids[rows], positions[rows], [tables[j] for j in seq_of_row[rows]])
        if picks:
            dst, src = zip(*picks, strict=True)
            out[list(dst)] = logits[list(src)].float().cpu().numpy()
    return out


def _run_tile(executor: TorchExecutor, token_ids: np.ndarray, positions: np.ndarray,
              tables: list[np.ndarray]) -> torch.Tensor:
    from llmc.targets.torch.attention import StepContext

    n, bs, dev = len(token_ids), executor.block_size, executor.torch_device
    longest = int(positions.max()) + 1
    width = -(-longest // KEY_TILE) * KEY_TILE
    ctx_slots = np.zeros((ROW_TILE, width), dtype=np.int64)
    mask = np.zeros((ROW_TILE, width), dtype=bool)
    mask[n:, 0] = True  # dummy rows attend to one (arbitrary) cache entry
    slot_mapping = np.empty(n, dtype=np.int64)
    for i in range(n):
        pos = np.arange(positions[i] + 1)
        slots = tables[i][pos // bs] * bs + pos % bs
        ctx_slots[i, : len(pos)] = slots
        mask[i, : len(pos)] = True
        slot_mapping[i] = slots[-1]
    ids = np.zeros(ROW_TILE, dtype=np.int64)
    ids[:n] = token_ids
    pos_all = np.zeros(ROW_TILE, dtype=np.int64)
    pos_all[:n] = positions
    t = lambda a: torch.from_numpy(a).to(dev)
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    ctx = StepContext(t(pos_all), t(slot_mapping), t(ctx_slots), empty, empty, t(mask), {})
    name = "prefill" if "prefill" in executor.programs else "decode"
    return executor.run_program(name, t(ids), torch.arange(ROW_TILE, device=dev), ctx)


def invariant_attend(kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     ctx: StepContext, scale: float) -> torch.Tensor:
    """Attention of each row over its own context (``ctx.ctx_slots``/``ctx.mask`` per row).

    Scores are per-element dot products over the head dim; the softmax uses the row's exact
    maximum; the sums over keys are taken per ``KEY_TILE`` keys and then accumulated tile by
    tile in order (``cumsum``), so padding the context with masked tiles only adds exact zeros.
    """
    n = ctx.slot_mapping.shape[0]
    kc.index_copy_(0, ctx.slot_mapping, k[:n].to(kc.dtype))
    vc.index_copy_(0, ctx.slot_mapping, v[:n].to(vc.dtype))
    rows, hq, d = q.shape
    hkv = k.shape[1]
    g, width = hq // hkv, ctx.ctx_slots.shape[1]
    tiles = width // KEY_TILE
    keys = kc[ctx.ctx_slots].to(q.dtype)[:, :, :, None, :]  # (R, L, Hkv, 1, D)
    values = vc[ctx.ctx_slots].to(q.dtype)[:, :, :, None, :]
    scores = (q.view(rows, 1, hkv, g, d) * keys).sum(-1) * scale  # (R, L, Hkv, G)
    scores = scores.masked_fill(~ctx.mask[:, :, None, None], float("-inf"))
    p = torch.exp(scores - scores.amax(1, keepdim=True))
    denom = p.view(rows, tiles, KEY_TILE, hkv, g).sum(2).cumsum(1)[:, -1]  # (R, Hkv, G)
    acc = torch.zeros((rows, 1, hkv, g, d), dtype=q.dtype, device=q.device)
    for t0 in range(0, width, CHUNK):  # bounded memory; the running sum stays strictly in tile order
        part = p[:, t0 : t0 + CHUNK, :, :, None] * values[:, t0 : t0 + CHUNK]
        part = part.view(rows, -1, KEY_TILE, hkv, g, d).sum(2)
        acc = torch.cat((acc, part), dim=1).cumsum(1)[:, -1:]
    return (acc[:, 0] / denom[..., None]).reshape(rows, hq, d)
