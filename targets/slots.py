"""Checks shared by executors whose KV cache is one fixed-capacity slot per sequence."""

from __future__ import annotations

from llmc.errors import LlmcError, RequestError
from llmc.targets.base import StepBatch


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
