"""The executor contract: what the runtime asks of a loaded artifact (:class:`Executor`), and
what one step hands it (:class:`StepBatch`) and learns about its cache (:class:`KVSpec`).

An executor runs one *step* over a batch of sequences: the new tokens of each (a prefill chunk
or one decode token, mixed freely), with its KV-cache blocks. The runtime owns block allocation
and scheduling; the executor owns the cache storage. Targets implement this contract
(``llmc.targets.*.executor``); the runtime never imports them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import RequestError
from llmc.compiler.ir.batch import BatchLayout


@dataclass
class StepBatch:
    """One step's inputs. ``block_tables[j]`` lists the cache blocks of sequence ``j``
    (for slot-based caches: one slot id); ``logits_rows`` picks the flattened token rows
    whose next-token logits are returned."""

    token_ids: np.ndarray
    layout: BatchLayout
    block_tables: list[list[int]]
    logits_rows: np.ndarray

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.logits_rows = np.asarray(self.logits_rows, dtype=np.int64)
        if self.token_ids.shape != (self.layout.num_tokens,):
            raise ValueError(f"{self.token_ids.shape[0]} token ids for a layout of {self.layout.num_tokens}")
        if len(self.block_tables) != len(self.layout.seq_ids):
            raise ValueError("one block table per sequence is required")

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
