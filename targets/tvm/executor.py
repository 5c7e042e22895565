"""Runs a tvm artifact with the Relax VM over llmc's paged KV cache (:mod:`llmc.targets.tvm.paged`).

The cache is one pages tensor per layer, allocated by :meth:`TvmExecutor.init_cache`; a page is a
runtime block, so the runtime's block tables say where every token's keys and values live (and
blocks may be shared: prefix caching). A step becomes TVM's CSR page tables
(:func:`step_tables`) and one function call:

* a decode step (one token per sequence, every row's logits) of at most the largest bucket's
  sequences runs ``decode_b{N}`` for the smallest bucket ``N`` that holds it, the batch padded
  with rows that write nothing and read no pages. Its inputs are device tensors per bucket
  (:class:`BucketBuffers`) kept for the executor's life and overwritten before each call, so the
  CUDA graph a CUDA build captures on a bucket's first call replays on the same pointers;
* a larger decode batch runs ``decode`` (symbolic batch); anything else runs ``prefill``.

:meth:`init_cache` allocates new pages and starts a new VM, whose CUDA-graph captures (bound to
the old pointers) are dropped with the old one.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import ArtifactError, LlmcError, RequestError, TargetUnavailableError
from llmc.compiler.weights import QuantizedTensor, Weight
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.tvm.model import bucket_name
from llmc.targets.tvm.paged import DECODE_INPUTS
from llmc.targets.tvm.target import LIBRARY, PAYLOAD

KV_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def weight_part(weight: Weight, part: str) -> np.ndarray:
    """The array a VM param slot holds: the float weight or one part of a quantized one
    (:func:`llmc.targets.tvm.model.param_parts`)."""
    if isinstance(weight, QuantizedTensor):
        try:
            return np.ascontiguousarray(weight.part(part))
        except KeyError as exc:
            raise ArtifactError(f"quantized weight has no {part}") from exc
    if part != "weight":
        raise ArtifactError(f"weight is not quantized but the library expects its {part}")
    return np.ascontiguousarray(weight)


def _to_tvm(array: np.ndarray, dev: Any) -> Any:
    import tvm

    if array.dtype.name == "bfloat16":
        out = tvm.runtime.empty(array.shape, "bfloat16", dev)
        out.copyfrom(array.view(np.uint16))
        return out
    return tvm.runtime.tensor(array, dev)


@dataclass
class StepTables:
    """One step's int32 inputs (:data:`llmc.targets.tvm.paged.PREFILL_INPUTS`), on the host."""

    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    q_indptr: np.ndarray
    page_indptr: np.ndarray
    page_values: np.ndarray
    last_page_len: np.ndarray


def step_tables(batch: StepBatch, page_size: int) -> StepTables:
    """TVM's page tables for ``batch``: per token its position and cache slot (``page * page_size +
    offset``), per sequence its pages (CSR: ``page_indptr``, ``page_values``) and the tokens in its
    last page, and the token offsets of the sequences (``q_indptr``)."""
    layout = batch.layout
    positions, slots, values = [], [], []
    pages_per_seq, last = [], []
    for j, table in enumerate(batch.block_tables):
        past, ctx = layout.past_len(j), layout.context_lens[j]
        pages = -(-ctx // page_size)
        if pages > len(table):
            raise RequestError(f"sequence {layout.seq_ids[j]} has {len(table)} cache blocks for {ctx} tokens")
        blocks = np.asarray(table[:pages], dtype=np.int64)
        pos = np.arange(past, ctx, dtype=np.int64)
        positions.append(pos)
        slots.append(blocks[pos // page_size] * page_size + pos % page_size)
        values.append(blocks)
        pages_per_seq.append(pages)
        last.append(ctx - (pages - 1) * page_size)
    i32 = lambda parts: np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    return StepTables(
        input_ids=batch.token_ids.astype(np.int32),
        positions=i32(positions),
        slots=i32(slots),
        q_indptr=np.concatenate([[0], np.cumsum(layout.query_lens)]).astype(np.int32),
        page_indptr=np.concatenate([[0], np.cumsum(pages_per_seq)]).astype(np.int32),
        page_values=i32(values),
        last_page_len=np.asarray(last, dtype=np.int32),
    )


class BucketBuffers:
    """The inputs of one ``decode_b{N}`` function: device tensors overwritten in place each step.

    Rows past the batch pad it to ``N``: token 0, position 0, slot -1 (nothing written) and no pages
    (nothing read). ``page_values`` holds up to ``capacity`` page ids; only the used prefix is copied.
    (One tensor per input: TVM's generated kernels refuse tensor views with a byte offset.)
    """

    def __init__(self, batch: int, capacity: int, dev: Any) -> None:
        import tvm

        self.batch, self.capacity = batch, capacity
        sizes = {"input_ids": batch, "positions": batch, "slots": batch, "page_indptr": batch + 1,
                 "last_page_len": batch, "page_values": capacity}
        self.host = {name: np.zeros(sizes[name], np.int32) for name in DECODE_INPUTS}
        self.views = [tvm.runtime.empty((sizes[name],), "int32", dev) for name in DECODE_INPUTS]

    def fits(self, tables: StepTables) -> bool:
        return int(tables.page_indptr[-1]) <= self.capacity

    def fill(self, tables: StepTables) -> None:
        """Write ``tables`` (``n <= N`` sequences, :meth:`fits`), pad, and copy them to the device."""
        n, host = len(tables.input_ids), self.host
        nnz = int(tables.page_indptr[-1])
        for name, values, pad in (("input_ids", tables.input_ids, 0), ("positions", tables.positions, 0),
                                  ("slots", tables.slots, -1), ("last_page_len", tables.last_page_len, 0)):
            host[name][:n] = values
            host[name][n:] = pad
        host["page_indptr"][:n + 1] = tables.page_indptr
        host["page_indptr"][n + 1:] = nnz
        host["page_values"][:nnz] = tables.page_values
        for name, device in zip(DECODE_INPUTS, self.views, strict=True):
            if name == "page_values":  # a view at offset 0 copies only the used prefix
                device._create_view((max(nnz, 1),), "int32", 0).copyfrom(host[name][:max(nnz, 1)])
            else:
                device.copyfrom(host[name])


class TvmExecutor(Executor):
    """Executes an exported TVM library on CPU (or, unverified here, a CUDA GPU)."""

    def __init__(self, artifact: Artifact, device: str | None = None, threads: int | None = None) -> None:
        import tvm

        self.payload = json.loads(artifact.file(PAYLOAD).read_text())
        self.config: ModelConfig = artifact.config
        kind = self.payload["device"]
        if device is not None and device.split(":")[0] != kind:
            raise LlmcError(f"this tvm artifact was compiled for {kind}; it cannot run on {device!r} (recompile)")
        self.device = kind
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(0, int(threads))
        self.dev = self._device(kind)
        try:
            self.lib = tvm.runtime.load_module(str(artifact.file(LIBRARY)))
        except Exception as exc:  # TVM raises its own error types
            raise TargetUnavailableError(f"cannot load {artifact.file(LIBRARY)}: {exc}") from exc
        self.vm = self._new_vm()
        weights = artifact.weights()
        self.params = [_to_tvm(weight_part(weights[name], part), self.dev)
                       for name, part in self.payload["param_slots"]]
        self.page_size = int(self.payload["page_size"])
        self.buckets = sorted(int(b) for b in self.payload.get("decode_buckets") or [])
        self.functions = set(self.payload["functions"])
        self.pages: list[Any] = []
        self.num_blocks = 0
        self._buckets: dict[int, BucketBuffers] = {}

    def _new_vm(self) -> Any:
        from tvm.runtime.vm import VirtualMachine  # works with a runtime-only TVM too

        return VirtualMachine(self.lib, self.dev)

    @staticmethod
    def _device(kind: str) -> Any:
        import tvm

        if kind == "cpu":
            return tvm.cpu(0)
        if kind == "cuda":
            from llmc.targets.tvm.build import ensure_cuda_runtime

            ensure_cuda_runtime()
            if not tvm.cuda(0).exist:
                raise TargetUnavailableError("this tvm artifact is for CUDA, and TVM sees no CUDA GPU here")
            return tvm.cuda(0)
        raise TargetUnavailableError(
            f"this tvm artifact is for {kind}; running it needs a TVM runtime built with {kind} support "
            "(the apache-tvm wheel has none) and a GPU"
        )

    # -- cache -----------------------------------------------------------------------------
    def _elem_bytes(self) -> int:
        return KV_DTYPE_BYTES.get(self.payload["kv_dtype"], 4)

    def kv_spec(self) -> KVSpec:
        c = self.config
        per_block = 2 * c.num_layers * self.page_size * c.num_kv_heads * c.head_dim * self._elem_bytes()
        return KVSpec("paged", self.page_size, per_block, -(-c.max_position // self.page_size))

    def init_cache(self, num_blocks: int) -> None:
        import tvm

        if num_blocks <= 0:
            raise LlmcError(f"the kv cache needs at least one block, got {num_blocks}")
        c = self.config
        shape = (num_blocks, 2, c.num_kv_heads, self.page_size, c.head_dim)
        self.pages, self._buckets = [], {}
        self.vm = self._new_vm()  # CUDA graphs captured over the old pages are dropped with the old VM
        # never read before written (the kernels read a sequence's first context_len slots only)
        self.pages = [tvm.runtime.empty(shape, self.payload["kv_dtype"], self.dev) for _ in range(c.num_layers)]
        self.num_blocks = num_blocks

    def max_pages_per_seq(self) -> int:
        return min(-(-self.config.max_position // self.page_size), self.num_blocks)

    # -- running ---------------------------------------------------------------------------
    def decode_bucket(self, batch: int) -> int | None:
        """The smallest decode bucket holding ``batch`` sequences (None: above the largest)."""
        i = bisect.bisect_left(self.buckets, batch)
        return self.buckets[i] if i < len(self.buckets) else None

    def _check(self, batch: StepBatch) -> None:
        if not self.pages:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        batch.check(self.config.vocab_size, self.config.max_position)
        for table in batch.block_tables:
            if table and (min(table) < 0 or max(table) >= self.num_blocks):
                raise RequestError(f"block ids must be in [0, {self.num_blocks}), got {min(table)}..{max(table)}")

    def step(self, batch: StepBatch) -> np.ndarray:
        self._check(batch)
        tables = step_tables(batch, self.page_size)
        run = self._bucket_call(batch, tables)
        if run is not None:
            return np.asarray(run().numpy()[:len(batch.layout.seq_ids)], dtype=np.float32)
        if batch.is_decode and "decode" in self.functions:
            args = [tables.input_ids, tables.positions, tables.slots, tables.page_indptr, tables.page_values,
                    tables.last_page_len]
            logits = self.vm["decode"](*self._upload(args), self.pages, self.params)
        else:
            args = [tables.input_ids, tables.positions, tables.slots, tables.q_indptr, tables.page_indptr,
                    tables.page_values, tables.last_page_len, batch.logits_rows.astype(np.int32)]
            logits = self.vm["prefill"](*self._upload(args), self.pages, self.params)
        return np.asarray(logits.numpy(), dtype=np.float32)

    def bucket_call(self, batch: StepBatch) -> Callable[[], Any] | None:
        """The decode bucket function for ``batch`` with its inputs written to the bucket's device buffers:
        a call that runs the step on the device and returns the padded device logits (no host transfer),
        the same call each time (benchmarks replay it: CUDA builds replay the captured graph). None when
        :meth:`step` would not run ``batch`` in a bucket (not a decode step, or above the largest)."""
        self._check(batch)
        return self._bucket_call(batch, step_tables(batch, self.page_size))

    def _bucket_call(self, batch: StepBatch, tables: StepTables) -> Callable[[], Any] | None:
        bucket = self.decode_bucket(len(batch.layout.seq_ids)) if batch.is_decode else None
        if bucket is None or bucket_name(bucket) not in self.functions:
            return None
        buffers = self._buckets.get(bucket)
        if buffers is None:
            capacity = min(bucket * self.max_pages_per_seq(), self.num_blocks)
            buffers = self._buckets[bucket] = BucketBuffers(bucket, capacity, self.dev)
        if not buffers.fits(tables):  # shared prefix pages counted once per sequence: the symbolic decode
            return None
        buffers.fill(tables)
        function, pages, params = self.vm[bucket_name(bucket)], self.pages, self.params
        return lambda: function(*buffers.views, pages, params)

    def _upload(self, arrays: list[np.ndarray]) -> list[Any]:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.int32), self.dev) for a in arrays]
