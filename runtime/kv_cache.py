"""KV cache bookkeeping (the executor owns the storage, this owns who uses which block).

- :class:`BlockAllocator`: a plain free list of fixed-size blocks (single-sequence tools).
- :class:`PagedKVCache`: the engine's manager for paged executors (``KVSpec.layout ==
  "paged"``). Sequences hold block tables that grow as they do. With prefix caching, every
  full block of computed tokens is registered under a hash of its tokens chained with the
  hash of everything before it; a new sequence whose prompt starts with registered blocks
  shares them (reference counted) and skips computing those tokens. Blocks whose count falls
  to zero stay cached and are evicted least-recently-freed first when a fresh block is needed.
  Shared blocks are always full and never written again, so no copy-on-write is needed.
- :class:`SlotKVCache`: for slot-based executors (``layout == "slots"``): one slot of the
  model's maximum length per running sequence, no sharing.

Both implement :class:`KVCacheManager`: ``admit`` (reserve for a new or resumed sequence,
returning how many leading tokens are already cached), ``ensure`` (grow to cover tokens),
``commit`` (register newly computed full blocks), ``free`` and ``stats``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass

from llmc.compiler.errors import LlmcError


class CacheFullError(LlmcError):
    """No free blocks left."""


class BlockAllocator:
    """Hands out fixed-size cache blocks and takes them back."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise LlmcError(f"the kv cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CacheFullError(f"kv cache full: {count} blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` in place so that it covers ``tokens`` tokens."""
        needed = self.blocks_for(tokens) - len(table)
        if needed > 0:
            table.extend(self.allocate(needed))


@dataclass
class CacheStats:
    """Usage counters (blocks; for slot caches a block is a slot)."""

    total_blocks: int
    used_blocks: int
    cached_free_blocks: int = 0
    prefix_queries: int = 0  # prompt tokens looked up
    prefix_hits: int = 0  # of those, tokens found cached

    @property
    def usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "kv_total_blocks": self.total_blocks,
            "kv_used_blocks": self.used_blocks,
            "kv_usage": self.usage,
            "kv_cached_free_blocks": self.cached_free_blocks,
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
        }


class KVCacheManager(ABC):
    """Which cache blocks (or slots) each sequence holds."""

    num_blocks: int
    block_size: int

    @property
    def max_sequences(self) -> int | None:
        """The most sequences it can hold at once (None: as many as their blocks allow)."""
        return None

    @abstractmethod
    def admit(self, seq_id: int, tokens: list[int], max_cached: int | None = None) -> int | None:
        """Start a sequence whose known tokens are ``tokens`` if the cache can hold them all
        now. Returns how many leading tokens are already cached (their blocks are in the
        table; at most ``max_cached`` when given), or None when the cache cannot take the
        sequence now."""

    @abstractmethod
    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        """Grow the sequence's table to cover ``num_tokens``; False if the cache is full."""

    def commit(self, seq_id: int, tokens: list[int], num_computed: int) -> None:  # noqa: B027 - optional
        """Tell the cache that the first ``num_computed`` of ``tokens`` are now stored."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Give back everything the sequence holds (finish, cancel or preemption)."""

    @abstractmethod
    def table(self, seq_id: int) -> list[int]:
        """The sequence's block table (for slots: ``[slot]``)."""

    @abstractmethod
    def stats(self) -> CacheStats: ...

    @abstractmethod
    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether one sequence of ``num_tokens`` fits in the whole cache."""


class PagedKVCache(KVCacheManager):
    """Paged blocks with reference counts and optional prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise LlmcError(f"the kv cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but holding a cached prefix block
        self._refs = [0] * num_blocks
        self._block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, its tokens)
        self._by_hash: dict[int, int] = {}
        self._tables: dict[int, list[int]] = {}
        self._hashes: dict[int, list[int]] = {}  # hashes of each sequence's committed full blocks
        self._queries = 0
        self._hits = 0

    # -- helpers --------------------------------------------------------------------------
    def _available(self) -> int:
        return len(self._free) + len(self._evictable)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            key = self._block_key.pop(block)
            del self._by_hash[key[0]]
        self._refs[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _lookup(self, tokens: list[int], max_cached: int | None = None) -> list[tuple[int, int]]:
        """Cached (hash, block) pairs covering a prefix of ``tokens`` (never the last token, nor
        more than ``max_cached`` tokens)."""
        bs, found, prev = self.block_size, [], 0
        limit = len(tokens) - 1 if max_cached is None else min(len(tokens) - 1, max_cached)
        for i in range(limit // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash((prev, chunk))
            block = self._by_hash.get(h)
            if block is None or self._block_key[block][1] != chunk:
                break
            found.append((h, block))
            prev = h
        return found

    # -- KVCacheManager -------------------------------------------------------------------
    def admit(self, seq_id: int, tokens: list[int], max_cached: int | None = None) -> int | None:
        hits = self._lookup(tokens, max_cached) if self.prefix_caching else []
        cached = len(hits) * self.block_size
        needed_total = -(-len(tokens) // self.block_size) - len(hits)
        reusable_free = sum(1 for _, b in hits if self._refs[b] == 0)  # hits now counted as available
        if needed_total > self._available() - reusable_free:
            return None
        for _, block in hits:
            self._ref(block)
        self._tables[seq_id] = [b for _, b in hits]
        self._hashes[seq_id] = [h for h, _ in hits]
        if self.prefix_caching:
            self._queries += len(tokens)
            self._hits += cached
        return cached

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        table = self._tables[seq_id]
        needed = -(-num_tokens // self.block_size) - len(table)
        if needed > self._available():
            return False
        table.extend(self._take() for _ in range(max(needed, 0)))
        return True

    def commit(self, seq_id: int, tokens: list[int], num_computed: int) -> None:
        if not self.prefix_caching:
            return
        bs, table, hashes = self.block_size, self._tables[seq_id], self._hashes[seq_id]
        for i in range(len(hashes), num_computed // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = hash((hashes[-1] if hashes else 0, chunk))
            hashes.append(h)
            block = table[i]
            if h not in self._by_hash and block not in self._block_key:
                self._by_hash[h] = block
                self._block_key[block] = (h, chunk)

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, [])
        self._hashes.pop(seq_id, None)
        for block in reversed(table):  # tail blocks are evicted first
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._block_key:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def can_ever_hold(self, num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) <= self.num_blocks

    def stats(self) -> CacheStats:
        return CacheStats(self.num_blocks, self.num_blocks - self._available(), len(self._evictable),
                          self._queries, self._hits)


class SlotKVCache(KVCacheManager):
    """One whole-context slot per running sequence (executors without paging)."""

    def __init__(self, num_slots: int, max_tokens: int) -> None:
        if num_slots <= 0:
            raise LlmcError(f"the kv cache needs at least one slot, got {num_slots}")
        self.num_blocks = num_slots
        self.block_size = max_tokens
        self._free = list(range(num_slots - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def max_sequences(self) -> int:
        return self.num_blocks

    def admit(self, seq_id: int, tokens: list[int], max_cached: int | None = None) -> int | None:
        if not self._free:
            return None
        self._tables[seq_id] = [self._free.pop()]
        return 0

    def ensure(self, seq_id: int, num_tokens: int) -> bool:
        return num_tokens <= self.block_size

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table:
            self._free.append(table[0])

    def table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def can_ever_hold(self, num_tokens: int) -> bool:
        return num_tokens <= self.block_size

    def stats(self) -> CacheStats:
        return CacheStats(self.num_blocks, self.num_blocks - len(self._free))
