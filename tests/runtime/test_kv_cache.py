"""The KV cache managers: paged blocks, prefix sharing by block hash, eviction, slots."""

from __future__ import annotations

import pytest

from llmc.errors import LlmcError
from llmc.runtime.kv_cache import BlockAllocator, CacheFullError, PagedKVCache, SlotKVCache


def test_prefix_blocks_are_shared_and_reference_counted() -> None:
    kv = PagedKVCache(num_blocks=10, block_size=4)
    a = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.admit(1, a) == 0
    assert kv.ensure(1, 10)
    kv.commit(1, a, 10)
    b = [*range(8), 99, 98, 97]
    assert kv.admit(2, b) == 8  # both full blocks found
    assert kv.table(2)[:2] == kv.table(1)[:2]
    assert kv.ensure(2, 11)
    assert kv.table(2)[2] not in kv.table(1)
    assert kv.stats().used_blocks == 4
    kv.free(1)
    assert kv.stats().used_blocks == 3  # shared blocks still held by 2
    kv.free(2)
    stats = kv.stats()
    assert stats.used_blocks == 0 and stats.cached_free_blocks == 2
    assert stats.prefix_hits == 8 and stats.prefix_queries == 21


def test_last_token_is_never_served_from_cache() -> None:
    kv = PagedKVCache(num_blocks=10, block_size=4)
    a = list(range(8))
    kv.admit(1, a)
    kv.ensure(1, 8)
    kv.commit(1, a, 8)
    kv.free(1)
    assert kv.admit(2, a) == 4  # the second block holds the last token, whose logits are needed


def test_different_prefix_same_block_tokens_do_not_match() -> None:
    kv = PagedKVCache(num_blocks=10, block_size=2)
    a = [1, 2, 3, 4, 5]
    kv.admit(1, a)
    kv.ensure(1, 5)
    kv.commit(1, a, 5)
    assert kv.admit(2, [9, 9, 3, 4, 5]) == 0  # block [3, 4] is cached, but after another prefix


def test_eviction_takes_least_recently_freed_cached_blocks() -> None:
    kv = PagedKVCache(num_blocks=4, block_size=2)
    for sid, toks in ((1, [1, 2, 3]), (2, [5, 6, 7])):
        kv.admit(sid, toks)
        kv.ensure(sid, 3)
        kv.commit(sid, toks, 3)
    kv.free(1)
    kv.free(2)
    assert kv.stats().cached_free_blocks == 2
    kv.admit(3, [8, 8, 8, 8, 8, 8, 8])  # needs all 4 blocks: evicts both cached ones
    assert kv.ensure(3, 7) and kv.stats().cached_free_blocks == 0
    assert not kv.ensure(3, 9)  # nothing left; no crash, no partial growth
    assert len(kv.table(3)) == 4
    kv.free(3)
    assert kv.admit(4, [1, 2, 3]) == 0  # evicted: no stale hit


def test_admission_refuses_what_does_not_fit() -> None:
    kv = PagedKVCache(num_blocks=3, block_size=4, prefix_caching=False)
    assert kv.admit(1, list(range(8))) == 0 and kv.ensure(1, 8)
    assert kv.admit(2, list(range(8))) is None  # needs 2 blocks, 1 free
    assert kv.stats().used_blocks == 2
    assert kv.can_ever_hold(12) and not kv.can_ever_hold(13)


def test_slot_cache() -> None:
    kv = SlotKVCache(num_slots=2, max_tokens=16)
    assert kv.admit(1, [1]) == 0 and kv.admit(2, [1]) == 0
    assert kv.admit(3, [1]) is None
    assert kv.ensure(1, 16) and not kv.ensure(1, 17)
    kv.free(1)
    assert kv.admit(3, [1]) == 0 and kv.stats().used_blocks == 2


def test_block_allocator() -> None:
    alloc = BlockAllocator(2, 4)
    table: list[int] = []
    alloc.grow(table, 8)
    assert alloc.free_blocks == 0
    with pytest.raises(CacheFullError):
        alloc.grow(table, 9)
    with pytest.raises(LlmcError):
        BlockAllocator(0, 4)
