"""Runs IR functions on the reference interpreter (NumPy, float64 by default) over a paged KV cache.

The cache is the same kind as the torch target's: one key and one value array per layer of
``num_blocks * block_size`` token slots; a step writes each new token's keys and values at the
slot its sequence's block table gives and reads a sequence's context through its table. The
interpreter reaches it through :class:`PagedKVView`, which gives attention the interpreter's
cache interface (:class:`~llmc.compiler.ir.interp.KVStore`) for one step's block tables, so
blocks can be shared and copied (prefix caching) exactly as on the other paged targets.
"""

from __future__ import annotations

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.interp import Interpreter
from llmc.compiler.weights import NUMPY_DTYPES, WeightStore
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.reference.lower import REFERENCE_OPS

DTYPES = ("float64", "float32")


class PagedKVView:
    """One step's view of the paged cache: ``append`` writes a sequence's new keys and values at
    the slots of its block table and returns its whole context."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, block_size: int, tables: dict[int, list[int]]) -> None:
        self.keys, self.values, self.block_size, self.tables = keys, values, block_size, tables

    def _slots(self, seq: int, start: int, stop: int) -> np.ndarray:
        table = np.asarray(self.tables[seq], dtype=np.int64)
        if len(table) * self.block_size < stop:
            raise LlmcError(f"sequence {seq} has {len(table)} blocks for {stop} tokens")
        pos = np.arange(start, stop)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray, past: int) -> tuple[np.ndarray, np.ndarray]:
        new = self._slots(seq, past, past + len(k))
        self.keys[layer, new] = k
        self.values[layer, new] = v
        context = self._slots(seq, 0, past + len(k))
        return self.keys[layer, context], self.values[layer, context]


class ReferenceExecutor(Executor):
    """The reference interpreter behind the executor contract (CPU only, not batch-invariant)."""

    def __init__(self, module: Module, weights: WeightStore, block_size: int = 16, dtype: str = "float64") -> None:
        REFERENCE_OPS.check_module(module)
        if dtype not in DTYPES:
            raise LlmcError(f"the reference target computes in {' or '.join(DTYPES)}, not {dtype!r}")
        if block_size <= 0:
            raise LlmcError(f"block_size must be positive, got {block_size}")
        self.module = module
        self.config = ModelConfig.from_dict(module.config)
        self.device = "cpu"
        self.block_size = int(block_size)
        self.dtype = NUMPY_DTYPES[dtype]
        self.interpreter = Interpreter(module, weights, self.dtype)
        self.keys: np.ndarray | None = None
        self.values: np.ndarray | None = None

    # -- cache ---------------------------------------------------------------------------
    def kv_spec(self) -> KVSpec:
        c = self.config
        per_block = 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize
        return KVSpec("paged", self.block_size, per_block, -(-c.max_position // self.block_size))

    def init_cache(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise LlmcError(f"the kv cache needs at least one block, got {num_blocks}")
        c = self.config
        shape = (c.num_layers, num_blocks * self.block_size, c.num_kv_heads, c.head_dim)
        self.keys, self.values = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        assert self.keys is not None and self.values is not None
        bs = self.block_size
        for src, dst in pairs:
            for cache in (self.keys, self.values):
                cache[:, dst * bs : (dst + 1) * bs] = cache[:, src * bs : (src + 1) * bs]

    # -- running -------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> np.ndarray:
        if self.keys is None or self.values is None:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        layout, c = batch.layout, self.config
        batch.check(c.vocab_size, c.max_position)
        ids, rows = batch.token_ids, batch.logits_rows
        function = "decode" if batch.is_decode and "decode" in self.module.functions else "prefill"
        inputs = {"input_ids": ids, "positions": np.asarray(layout.positions(), dtype=np.int64),
                  "logits_index": rows}
        view = PagedKVView(self.keys, self.values, self.block_size,
                           dict(zip(layout.seq_ids, batch.block_tables, strict=True)))
        logits = self.interpreter.run(function, inputs, layout, view)["logits"]
        return np.asarray(logits, dtype=np.float32)
