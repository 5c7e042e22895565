"""KV cache block allocation (the executor owns the storage, this owns the bookkeeping)."""

from __future__ import annotations

from llmc.errors import LlmcError


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
