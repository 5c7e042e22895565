"""What executors whose KV cache is one fixed-capacity slot per sequence share: the cache's
spec, the slot-count check, the per-step slot checks and the cache storage itself (:class:`SlotBuffers`,
used by the onnx and tensorrt executors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError, RequestError
from llmc.runtime.executor import KVSpec, StepBatch


def slot_kv_spec(config: ModelConfig, capacity: int) -> KVSpec:
    """One float32 slot of ``capacity`` tokens (keys and values of every layer) per sequence."""
    per_slot = 2 * config.num_layers * config.num_kv_heads * capacity * config.head_dim * 4
    return KVSpec("slots", capacity, per_slot, 1)


def checked_slot_count(num_blocks: int) -> int:
    """``num_blocks`` (the runtime's blocks are slots here), refused unless positive."""
    if num_blocks <= 0:
        raise LlmcError(f"the kv cache needs at least one slot, got {num_blocks}")
    return num_blocks


def slot_ids(batch: StepBatch, num_slots: int, capacity: int, owner: str, slot_note: str,
             capacity_hint: str) -> list[int]:
    """The slot of each sequence of ``batch``, checking table shape, range and capacity.

    ``owner`` names the executor, ``slot_note`` follows "tokens per sequence" in the one-slot
    error and ``capacity_hint`` explains, in parentheses, what bounds a slot.
    """
    layout = batch.layout
    slots = []
    for j, table in enumerate(batch.block_tables):
        seq = layout.seq_ids[j]
        if len(table) != 1:
            raise LlmcError(f"sequence {seq}: the {owner} executor keeps one kv slot of {capacity} tokens "
                            f"per sequence{slot_note}, got {len(table)} blocks")
        if not 0 <= table[0] < num_slots:
            raise LlmcError(f"sequence {seq}: slot {table[0]} is outside the {num_slots} allocated")
        if layout.context_lens[j] > capacity:
            raise RequestError(f"sequence {seq} needs {layout.context_lens[j]} tokens of kv cache; a slot holds "
                               f"{capacity} ({capacity_hint})")
        slots.append(int(table[0]))
    return slots


def slot_capacity(config: ModelConfig, kv_capacity: int | None, limit: int | None = None) -> int:
    """Tokens per slot: ``kv_capacity`` (default: the model context), at most the context and ``limit``."""
    capacity = int(kv_capacity or config.max_position)
    if capacity <= 0:
        raise LlmcError(f"kv_capacity must be positive, got {capacity}")
    return min(capacity, config.max_position, *(() if limit is None else (limit,)))


class SlotBuffers:
    """One float32 buffer per layer for keys and one for values, ``[slots, kv_heads, allocated,
    head_dim]``: slot ``s`` holds one sequence's cache. ``allocated`` grows on demand (doubling, up
    to ``capacity``) keeping what the slots hold, so a short context does not pay for a long one.

    ``zeros(shape)`` makes a buffer (numpy arrays, torch tensors: anything with slice assignment);
    with ``growable=False`` (device buffers bound by pointer) the first allocation is final.
    """

    def __init__(self, config: ModelConfig, capacity: int, zeros: Callable[[tuple[int, ...]], Any],
                 growable: bool = True) -> None:
        self.config = config
        self.capacity = capacity
        self.zeros = zeros
        self.growable = growable
        self.num_slots = 0
        self.allocated = 0
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.generation = 0
        """Counts (re)allocations: buffers bound by pointer are stale once it changes."""

    def spec(self) -> KVSpec:
        return slot_kv_spec(self.config, self.capacity)

    @property
    def slot_shape(self) -> tuple[int, int, int]:
        """``(kv_heads, allocated, head_dim)``: one slot of one layer's keys (or values)."""
        return (self.config.num_kv_heads, self.allocated, self.config.head_dim)

    @property
    def stores(self) -> tuple[Any, ...]:
        """Every buffer: the keys of each layer, then the values."""
        return (*self.keys, *self.values)

    def allocate(self, num_slots: int, tokens: int) -> None:
        """Drop everything and allocate ``num_slots`` slots of ``tokens`` tokens (at most the capacity)."""
        self.num_slots = checked_slot_count(num_slots)
        self.keys, self.values, self.allocated = [], [], 0
        self.grow(tokens)

    def grow(self, tokens: int) -> None:
        """Reallocate every slot for at least ``tokens`` tokens (doubling), keeping what they hold."""
        size = min(self.capacity, max(tokens, 2 * self.allocated))
        c = self.config
        shape = (self.num_slots, c.num_kv_heads, size, c.head_dim)
        if self.keys and not self.growable:
            raise LlmcError("this kv cache is allocated at full capacity and cannot grow")
        old = self.allocated
        grown = []
        for store in self.stores:
            new = self.zeros(shape)
            new[:, :, :old] = store[:, :, :old]
            grown.append(new)
        if not grown:
            grown = [self.zeros(shape) for _ in range(2 * c.num_layers)]
        self.keys, self.values = grown[: c.num_layers], grown[c.num_layers:]
        self.allocated = size
        self.generation += 1

    def require_allocated(self) -> None:
        if not self.keys:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")

    def ensure(self, tokens: int) -> bool:
        """Grow so a slot holds ``tokens`` tokens; True when the buffers were reallocated."""
        if tokens <= self.allocated:
            return False
        self.grow(tokens)
        return True

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy slot ``src`` to slot ``dst`` in every buffer, for each pair."""
        for src, dst in pairs:
            for store in self.stores:
                store[dst] = store[src]
