"""The executor contract: what the runtime asks of a loaded artifact (:class:`Executor`), and
what one step hands it (:class:`StepBatch`) and learns about its cache (:class:`KVSpec`).

An executor runs one *step* over a batch of sequences: the new tokens of each (a prefill chunk
or one decode token, mixed freely), with its KV-cache blocks. The runtime owns block allocation
and scheduling; the executor owns the cache storage. Targets implement this contract
(``llmc.targets.*.executor``); the runtime never imports them.

Two ways to run a step:

- :meth:`Executor.step` returns the logits of the rows asked for (every executor has it;
  benchmarks, evaluation and parity checks use it).
- :meth:`Executor.launch` runs a step *and samples it*, returning a :class:`PendingStep` whose
  :meth:`~PendingStep.result` gives the sampled token ids (:class:`StepOutput`). The default
  runs :meth:`step` and samples on the host (:func:`~llmc.runtime.sampling.sample_batch`) before
  returning a step that is already :meth:`~PendingStep.ready`, so every executor works with the
  engine unchanged. An executor that overrides it may return before the step has run (a GPU
  queue, a worker thread) and sample on its device, so only token ids cross back. While such a
  step is in flight the engine prepares and launches the next one: decode tokens that the
  in-flight step is still sampling are *deferred* in the next :class:`StepBatch`
  (``deferred_rows``/``deferred_from``), and the executor fills them in from that step's
  samples on its side. An executor whose launch returns steps that are not ready must accept
  deferred rows; the engine never sends them to one whose steps are ready at launch.
"""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.sampling import SampleRow, TokenLogprobs, sample_batch

_NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass
class StepBatch:
    """One step's inputs. ``block_tables[j]`` lists the cache blocks of sequence ``j``
    (for slot-based caches: one slot id); ``logits_rows`` picks the flattened token rows
    whose next-token logits are returned.

    ``deferred_rows`` are rows of ``token_ids`` the host does not know yet (they hold -1): row
    ``deferred_rows[i]`` is the token the previously launched step sampled for its
    ``deferred_from[i]``-th logits row. Only :meth:`Executor.launch` of an executor whose steps
    complete after launch receives them. An executor reads ``block_tables`` during
    :meth:`Executor.launch` (the runtime may grow them in place afterwards)."""

    token_ids: np.ndarray
    layout: BatchLayout
    block_tables: list[list[int]]
    logits_rows: np.ndarray
    deferred_rows: np.ndarray = field(default_factory=lambda: _NO_ROWS)
    deferred_from: np.ndarray = field(default_factory=lambda: _NO_ROWS)

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.logits_rows = np.asarray(self.logits_rows, dtype=np.int64)
        self.deferred_rows = np.asarray(self.deferred_rows, dtype=np.int64)
        self.deferred_from = np.asarray(self.deferred_from, dtype=np.int64)
        if self.token_ids.shape != (self.layout.num_tokens,):
            raise ValueError(f"{self.token_ids.shape[0]} token ids for a layout of {self.layout.num_tokens}")
        if len(self.block_tables) != len(self.layout.seq_ids):
            raise ValueError("one block table per sequence is required")
        if self.deferred_rows.shape != self.deferred_from.shape:
            raise ValueError("deferred_rows and deferred_from differ in length")

    @property
    def has_deferred(self) -> bool:
        return bool(self.deferred_rows.size)

    def resolve_deferred(self, previous: np.ndarray) -> StepBatch:
        """This batch with its deferred rows filled from ``previous`` (the token ids the previous
        step sampled): what an executor that samples on the host runs. The rows stay listed (see
        :meth:`extra_outputs`)."""
        if not self.has_deferred:
            return self
        ids = self.token_ids.copy()
        ids[self.deferred_rows] = np.asarray(previous, dtype=np.int64)[self.deferred_from]
        return StepBatch(ids, self.layout, self.block_tables, self.logits_rows, self.deferred_rows, self.deferred_from)

    def extra_outputs(self, token_ids: np.ndarray) -> np.ndarray | None:
        """Per logits row, the deferred token that row's sequence generated last (-1: none), from
        the resolved ``token_ids``: penalties count it as an output the host has not seen yet."""
        if not self.has_deferred:
            return None
        deferred = np.isin(self.logits_rows, self.deferred_rows)
        return np.where(deferred, np.asarray(token_ids)[self.logits_rows], -1)

    def check(self, vocab_size: int, max_position: int) -> None:
        """Refuse token ids outside the vocabulary, a context beyond ``max_position`` tokens and
        logits rows outside the step's tokens (:class:`RequestError` with the numbers): every
        executor calls this first, so none reads out of bounds."""
        ids, layout, rows = self.token_ids, self.layout, self.logits_rows
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise RequestError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
        if layout.context_lens and max(layout.context_lens) > max_position:
            raise RequestError(f"position {max(layout.context_lens) - 1} is beyond the context of {max_position}")
        if rows.size and (rows.min() < 0 or rows.max() >= layout.num_tokens):
            raise RequestError(f"logits rows {rows.tolist()} are outside the {layout.num_tokens} tokens of the step")

    @property
    def is_decode(self) -> bool:
        """True when every sequence feeds one token and wants its logits."""
        n = len(self.layout.seq_ids)
        return all(q == 1 for q in self.layout.query_lens) and np.array_equal(
            self.logits_rows, np.arange(n)
        )


@dataclass(frozen=True)
class KVSpec:
    """How an executor's cache is organised."""

    layout: Literal["paged", "slots"]
    block_size: int
    bytes_per_block: int
    max_blocks_per_seq: int
    uses_block_tables: bool = True
    """False when the executor pages its cache internally (tvm): the runtime's block tables
    only count capacity, so blocks cannot be shared between sequences (no prefix caching)."""


@dataclass
class StepOutput:
    """A sampled step: the token id of each logits row, and its logprobs where asked for."""

    token_ids: np.ndarray
    logprobs: list[TokenLogprobs | None]


class PendingStep(ABC):
    """A launched step whose sampled tokens may not exist yet."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether :meth:`result` would return without waiting."""

    @abstractmethod
    def result(self) -> StepOutput:
        """The sampled tokens (waits for the step; raises what the step raised)."""


class DoneStep(PendingStep):
    """A step that ran synchronously (what :meth:`Executor.launch` returns by default)."""

    def __init__(self, output: StepOutput) -> None:
        self.output = output

    def ready(self) -> bool:
        return True

    def result(self) -> StepOutput:
        return self.output


class FutureStep(PendingStep):
    """A step running elsewhere (a worker thread, a process), as a :class:`concurrent.futures.Future`."""

    def __init__(self, future: concurrent.futures.Future[StepOutput]) -> None:
        self.future = future

    def ready(self) -> bool:
        return self.future.done()

    def result(self) -> StepOutput:
        return self.future.result()


def sample_step(logits: np.ndarray, batch: StepBatch, rows: list[SampleRow]) -> StepOutput:
    """Sample a step's logits on the host (``batch`` with its deferred rows resolved)."""
    tokens, logprobs = sample_batch(logits, rows, extra_outputs=batch.extra_outputs(batch.token_ids))
    return StepOutput(np.asarray(tokens, dtype=np.int64), logprobs)


class Executor(ABC):
    """A loaded artifact that runs steps."""

    config: ModelConfig
    device: str

    @abstractmethod
    def kv_spec(self) -> KVSpec:
        """The cache layout and the cost of one block."""

    @abstractmethod
    def init_cache(self, num_blocks: int) -> None:
        """Allocate the cache storage for ``num_blocks`` blocks (or slots)."""

    @abstractmethod
    def step(self, batch: StepBatch) -> np.ndarray:
        """Run one step; returns float32 logits ``[len(logits_rows), vocab]``."""

    def launch(self, batch: StepBatch, rows: list[SampleRow]) -> PendingStep:
        """Run one step and sample each logits row ``i`` as ``rows[i]`` says.

        The default runs :meth:`step` and :func:`~llmc.runtime.sampling.sample_batch` now and
        returns a ready step (it never receives deferred rows). Overrides may return before the
        step has run and must then accept deferred rows referring to the step launched before."""
        if batch.has_deferred:
            raise ValueError("deferred token rows need an executor whose launch returns before the step has run")
        return DoneStep(sample_step(self.step(batch), batch, rows))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:  # pragma: no cover - optional
        """Copy cache blocks ``src -> dst`` (for copy-on-write prefix sharing)."""
        raise NotImplementedError

    def release(self, seq_id: int) -> None:
        """Sequence ``seq_id`` finished: drop any per-sequence state the executor keeps.

        Executors that use the runtime's block tables keep none (the default is a no-op); the
        runtime calls this when it frees a sequence's blocks. Executors whose cache pages
        internally (tvm) free the sequence's pages here.
        """
        return None

    def bind_step_thread(self) -> None:
        """Called once on the thread that will run :meth:`step` (the engine's loop), before the
        first step: executors with per-thread state (a CPU thread pool) set it up here."""
        return None

    def device_peak_bytes(self) -> int | None:
        """Peak device memory this executor's allocator has seen, where it can tell (else None)."""
        return None

    def device_memory(self) -> tuple[int, int] | None:
        """(free, total) bytes of the accelerator the executor runs on, where it has one (else None):
        what a KV budget given as a fraction of the device (``gpu_memory_utilization``) is taken from."""
        return None
