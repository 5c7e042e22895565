"""A fake executor that checks the engine's cache bookkeeping without a model.

It stores each token id in its cache slot and computes the next token from the context it
reads back through the block table, so a wrong table, a wrongly shared prefix block or a
missing write changes the output (or trips an assertion), exactly as it would with a model.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.runtime.executor import Executor, FutureStep, KVSpec, PendingStep, StepBatch, StepOutput, sample_step
from llmc.runtime.sampling import SampleRow


def next_token(context: list[int], vocab: int, eos: int | None = None) -> int:
    """The fake model: a hash of the whole context (EOS only when ``eos`` is given and hit)."""
    h = 0
    for i, t in enumerate(context):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    token = 3 + h % (vocab - 3)
    if eos is not None and h % 11 == 0:
        return eos
    return token


def reference(prompt: list[int], max_tokens: int, vocab: int, eos: int | None = None) -> list[int]:
    """What greedy generation must produce for ``prompt``."""
    ctx, out = list(prompt), []
    for _ in range(max_tokens):
        t = next_token(ctx, vocab, eos)
        out.append(t)
        ctx.append(t)
        if t == eos:
            break
    return out


class FakeExecutor(Executor):
    """Paged or slot-based fake; ``delay`` slows steps, ``gate`` (an Event) blocks them."""

    def __init__(self, vocab: int = 64, max_position: int = 256, block_size: int = 4, layout: str = "paged",
                 eos: int | None = None, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.config = ModelConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                  num_kv_heads=1, head_dim=8, max_position=max_position,
                                  eos_token_ids=(eos,) if eos is not None else ())
        self.device = "cpu"
        self.layout = layout
        self.block_size = block_size if layout == "paged" else max_position
        self.eos = eos
        self.delay = delay
        self.fail_on = fail_on
        self.gate: threading.Event | None = None
        self.cache = np.zeros(0, dtype=np.int64)
        self.batches: list[StepBatch] = []

    def kv_spec(self) -> KVSpec:
        if self.layout == "slots":
            return KVSpec("slots", self.block_size, 64 * self.block_size, 1)
        return KVSpec("paged", self.block_size, 64, -(-self.config.max_position // self.block_size))

    def init_cache(self, num_blocks: int) -> None:
        self.cache = np.full(num_blocks * self.block_size, -1, dtype=np.int64)

    def step(self, batch: StepBatch) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in batch.token_ids:
            raise RuntimeError("fake executor failure")
        self.batches.append(batch)
        layout, bs = batch.layout, self.block_size
        row_ctx: dict[int, list[int]] = {}
        for j, start in enumerate(layout.starts()):
            table, past = batch.block_tables[j], layout.past_len(j)
            assert len(table) * bs >= layout.context_lens[j], "block table too short"
            for i in range(layout.query_lens[j]):
                pos = past + i
                self.cache[table[pos // bs] * bs + pos % bs] = batch.token_ids[start + i]
            for i in range(layout.query_lens[j]):
                pos = past + i
                ctx = [int(self.cache[table[p // bs] * bs + p % bs]) for p in range(pos + 1)]
                assert -1 not in ctx, "read an unwritten cache slot"
                row_ctx[start + i] = ctx
        logits = np.zeros((len(batch.logits_rows), self.config.vocab_size), dtype=np.float32)
        for r, row in enumerate(batch.logits_rows):
            logits[r, next_token(row_ctx[int(row)], self.config.vocab_size, self.eos)] = 5.0
        return logits


class WorkerThreadLaunch:
    """Mixin for an :class:`Executor`: ``launch`` queues the step and its sampling on one worker thread
    and returns at once, as a GPU executor's does, so the engine overlaps and defers tokens. The batch
    is copied at launch; deferred rows are filled on the worker from the previous step's samples."""

    launches = 0
    deferred_launches = 0
    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _last: concurrent.futures.Future[StepOutput] | None = None

    def launch(self, batch: StepBatch, rows: list[SampleRow]) -> PendingStep:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmc-test-step")
        snapshot = StepBatch(batch.token_ids.copy(), batch.layout, [list(t) for t in batch.block_tables],
                             batch.logits_rows.copy(), batch.deferred_rows.copy(), batch.deferred_from.copy())
        previous = self._last

        def run() -> StepOutput:
            resolved = snapshot
            if snapshot.has_deferred:
                assert previous is not None, "deferred rows without a previous step"
                resolved = snapshot.resolve_deferred(previous.result().token_ids)
            return sample_step(self.step(resolved), resolved, rows)  # type: ignore[attr-defined]

        self._last = self._pool.submit(run)
        self.launches += 1
        self.deferred_launches += int(batch.has_deferred)
        return FutureStep(self._last)


class ThreadedFakeExecutor(WorkerThreadLaunch, FakeExecutor):
    """The fake executor with launches on a worker thread."""


class OnWorkerThread(WorkerThreadLaunch, Executor):
    """Any executor, its steps launched on a worker thread (everything else delegated)."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.config = inner.config
        self.device = inner.device

    def kv_spec(self) -> KVSpec:
        return self.inner.kv_spec()

    def init_cache(self, num_blocks: int) -> None:
        self.inner.init_cache(num_blocks)

    def step(self, batch: StepBatch) -> np.ndarray:
        return self.inner.step(batch)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.inner.copy_blocks(pairs)

    def release(self, seq_id: int) -> None:
        self.inner.release(seq_id)
