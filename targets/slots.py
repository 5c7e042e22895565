"""What executors whose KV cache is one fixed-capacity slot per sequence share: the cache's
spec, the slot-count check and the per-step slot checks."""

from __future__ import annotations

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
