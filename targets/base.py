"""The interface between targets and the runtime: :class:`Target` and :class:`Executor`.

Every target compiles the IR into an artifact payload (:meth:`Target.emit`) and loads it back
as an :class:`Executor`. An executor runs one *step* over a batch of sequences: the new tokens
of each (a prefill chunk or one decode token, mixed freely), with its KV-cache blocks. The
runtime owns block allocation and scheduling; the executor owns the cache storage.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter


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
class EmitResult:
    """What a target records in the manifest about its payload."""

    options: dict[str, Any]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


class Target(ABC):
    """A code generator plus the loader of what it generates."""

    name: ClassVar[str]
    doc: ClassVar[str]
    fused_ops: ClassVar[frozenset[str]] = frozenset()
    quant_bits: ClassVar[frozenset[int]] = frozenset({4, 8})
    stores_weights: ClassVar[bool] = False
    """True when the payload holds the weights itself: the driver then writes no ``weights/`` copy
    and :meth:`read_weights` reads them back from the payload."""

    def availability(self) -> str | None:
        """None when usable here, else the reason it is not."""
        return None

    def preferred_passes(self, opt_level: int) -> list[str] | None:
        """The pass list this target wants at ``opt_level`` (None: the generic pipeline)."""
        return None

    @abstractmethod
    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        """Write the target payload (weights and IR are written by the driver)."""

    @abstractmethod
    def load(self, artifact: Artifact, **options: Any) -> Executor:
        """Load an artifact written by :meth:`emit`."""

    def read_weights(self, artifact: Artifact) -> WeightStore:
        """The params of an artifact whose payload stores them (``stores_weights``)."""
        from llmc.errors import ArtifactError

        raise ArtifactError(f"{artifact.path}: target {self.name!r} keeps no weights in its payload")
