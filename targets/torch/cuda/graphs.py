"""Batch buckets, a decode step's static inputs, and the CUDA graphs replaying it.

A decode step of ``n`` sequences runs in the smallest bucket ``B >= n`` (:data:`BUCKETS`, 1 ... 256): its
inputs live in :class:`StaticDecodeBuffers` of ``B`` rows whose addresses never change, so the step's
kernels can be captured once per bucket (:class:`DecodeGraphs`) and replayed with new contents. The host
side (:func:`host_decode_inputs`, NumPy only) pads the batch to its bucket: padding rows read token 0 at
position 0 over a context of one slot, the *scratch* slot (a block the runtime never hands out), and
write their keys and values there, so they touch no sequence's cache. Block tables are a fixed
``[B, width]`` array whose used columns are updated in place; tokens the previous step is still
sampling (the engine's deferred rows) are copied into the token buffer on the device, never through
the host.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llmc.compiler.errors import LlmcError, RequestError
from llmc.runtime.executor import StepBatch

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
"""Decode batch sizes with a graph each: powers of two up to 16, then steps of at most 32 rows, so padding
costs at most a third of a step's rows above 16 sequences (and under 14% above 224)."""


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding ``n`` rows, or None when ``n`` exceeds the largest (run eagerly)."""
    if n < 1:
        raise ValueError(f"a decode step has at least one sequence, got {n}")
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


@dataclass
class HostDecodeInputs:
    """A decode step's inputs on the host, padded to ``bucket`` rows (int64 NumPy arrays).

    ``token_ids`` holds -1 at ``deferred_rows`` (filled on the device from ``deferred_from`` rows of the
    previous step's tokens); rows ``n ...`` are padding."""

    n: int
    bucket: int
    token_ids: np.ndarray  # [B]
    positions: np.ndarray  # [B]
    context_lens: np.ndarray  # [B]
    slot_mapping: np.ndarray  # [B]
    block_tables: np.ndarray  # [B, used]: the columns this step reads (the widest context's blocks)
    deferred_rows: np.ndarray
    deferred_from: np.ndarray


def host_decode_inputs(batch: StepBatch, bucket: int, block_size: int, width: int, scratch_block: int,
                       max_position: int) -> HostDecodeInputs:
    """``batch`` (a decode step, :attr:`StepBatch.is_decode`) padded to ``bucket`` rows.

    Block tables are cut to the columns the step reads (the kernels read a row's first
    ``ceil(context / block_size)`` entries only), so a step moves ``B x used`` entries, not ``B x width``.
    Copies every block table now (the runtime may grow them after launch); refuses a position past the
    context (``RequestError``) and a table too short for its sequence or wider than ``width``."""
    layout = batch.layout
    n = len(layout.seq_ids)
    if not batch.is_decode:
        raise ValueError("host_decode_inputs takes decode steps (one token per sequence, every row's logits)")
    if n > bucket:
        raise ValueError(f"{n} sequences do not fit a bucket of {bucket}")
    clens = np.asarray(layout.context_lens, dtype=np.int64)
    positions = clens - 1
    if positions.size and int(positions.max()) >= max_position:
        raise RequestError(f"position {int(positions.max())} is beyond the context of {max_position}")
    needs = -(-clens // block_size)
    used = max(1, int(needs.max()))
    if used > width:
        j = int(np.argmax(needs))
        raise LlmcError(f"sequence {layout.seq_ids[j]} needs {used} blocks, more than the {width} a table holds")
    tables = np.full((bucket, used), scratch_block, dtype=np.int64)
    for j, table in enumerate(batch.block_tables):
        need = int(needs[j])
        if len(table) < need:
            raise LlmcError(f"sequence {layout.seq_ids[j]} has {len(table)} blocks for {int(clens[j])} tokens")
        tables[j, :need] = table[:need]
    pad = bucket - n
    rows = np.arange(n)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    return HostDecodeInputs(
        n, bucket,
        token_ids=np.concatenate([batch.token_ids, np.zeros(pad, dtype=np.int64)]),
        positions=np.concatenate([positions, np.zeros(pad, dtype=np.int64)]),
        context_lens=np.concatenate([clens, np.ones(pad, dtype=np.int64)]),
        slot_mapping=np.concatenate([slots, np.full(pad, scratch_block * block_size, dtype=np.int64)]),
        block_tables=tables,
        deferred_rows=batch.deferred_rows.copy(),
        deferred_from=batch.deferred_from.copy(),
    )


class StaticDecodeBuffers:
    """One bucket's device inputs at fixed addresses, refilled in place before each replay."""

    NAMES = ("token_ids", "positions", "context_lens", "slot_mapping", "block_tables")

    def __init__(self, bucket: int, width: int, device: torch.device) -> None:
        self.bucket, self.width, self.device = bucket, width, device
        self.token_ids = torch.zeros(bucket, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(bucket, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(bucket, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((bucket, width), dtype=torch.int64, device=device)
        self.logits_index = torch.arange(bucket, dtype=torch.int64, device=device)
        pin = device.type == "cuda"  # page-locked staging: the copies are asynchronous
        self._staging = {name: torch.empty_like(getattr(self, name), device="cpu", pin_memory=pin)
                         for name in self.NAMES}

    def load(self, inputs: HostDecodeInputs, previous_tokens: torch.Tensor | None) -> None:
        """Copy ``inputs`` in (asynchronously on a GPU) and fill the deferred rows from ``previous_tokens``
        (the device tokens of the step launched before this one)."""
        used = inputs.block_tables.shape[1]
        if inputs.bucket != self.bucket or used > self.width:
            raise ValueError(f"inputs for bucket {inputs.bucket} x {used} "
                             f"do not fit buffers of {self.bucket} x {self.width}")
        for name in self.NAMES:
            staging, target = self._staging[name], getattr(self, name)
            if name == "block_tables":  # the columns in use; the rest are never read
                staging, target = staging.view(-1)[: self.bucket * used].view(self.bucket, used), target[:, :used]
            staging.numpy()[...] = getattr(inputs, name)
            target.copy_(staging, non_blocking=True)
        if inputs.deferred_rows.size:
            if previous_tokens is None:
                raise LlmcError("a decode step defers tokens to a previous step this executor did not run")
            rows = torch.from_numpy(inputs.deferred_rows).to(self.device, non_blocking=True)
            src = torch.from_numpy(inputs.deferred_from).to(self.device, non_blocking=True)
            self.token_ids.index_copy_(0, rows, previous_tokens.index_select(0, src))


Forward = Callable[[StaticDecodeBuffers], torch.Tensor]
"""The decode step over a bucket's buffers: logits ``[B, vocab]``."""


class DecodeGraphs:
    """Per bucket: its buffers, and (``capture``) the CUDA graph of ``forward`` over them, captured on first
    use after two warm-up runs (Triton compiles its kernels there), all graphs sharing one memory pool.
    Without ``capture`` the same ``forward`` runs eagerly on the same buffers (a CPU, or a check)."""

    def __init__(self, forward: Forward, width: int, device: torch.device, capture: bool,
                 buckets: tuple[int, ...] = BUCKETS) -> None:
        if capture and device.type != "cuda":
            raise LlmcError(f"CUDA graphs need a CUDA device, not {device}")
        self.forward, self.width, self.device, self.capture, self.buckets = forward, width, device, capture, buckets
        self.buffers: dict[int, StaticDecodeBuffers] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def buffers_for(self, bucket: int) -> StaticDecodeBuffers:
        if bucket not in self.buffers:
            self.buffers[bucket] = StaticDecodeBuffers(bucket, self.width, self.device)
        return self.buffers[bucket]

    def run(self, bucket: int) -> torch.Tensor:
        """The logits ``[bucket, vocab]`` of the inputs loaded into ``buffers_for(bucket)``; with graphs they
        live in the graph's output buffer, overwritten by the next replay of that bucket."""
        buffers = self.buffers_for(bucket)
        if not self.capture:
            return self.forward(buffers)
        if bucket not in self.graphs:
            self._capture(bucket, buffers)
        self.graphs[bucket].replay()
        return self.outputs[bucket]

    def _capture(self, bucket: int, buffers: StaticDecodeBuffers) -> None:
        # the warm-ups run the loaded inputs: they write the same keys and values to the same slots as
        # the replay that follows, so the cache ends as if the step had run once
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(buffers)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[bucket] = self.forward(buffers)
        self.graphs[bucket] = graph

    def clear(self) -> None:
        """Drop every graph (the cache they point into was reallocated)."""
        self.graphs.clear()
        self.outputs.clear()
        self.buffers.clear()
        self._pool = None
