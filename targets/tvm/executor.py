"""Runs a tvm artifact with the Relax VM over TVM's paged KV cache.

TVM's cache pages internally, so the runtime's block tables are not used: each llmc sequence
id is a TVM sequence. A step maps onto the cache as

* a sequence seen for the first time is added (``kv_state_add_sequence``); a known one whose
  step says it holds fewer tokens than the cache has (a restarted or rolled-back sequence) is
  cut back with ``kv_state_popn`` (or removed and re-added when it restarts from zero);
* ``begin_forward(seq_ids, query_lens)`` in the order of the flattened batch, then the
  ``decode`` function (every sequence feeds one token and wants its logits) or ``prefill``
  (ragged prefill chunks and decode tokens mixed; logits for ``logits_rows``), then
  ``end_forward``;
* :meth:`TvmExecutor.release` removes a finished sequence and frees its pages;
  :meth:`init_cache` starts a new, empty cache.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import ArtifactError, LlmcError, RequestError, TargetUnavailableError
from llmc.compiler.weights import QuantizedTensor, Weight
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.tvm.model import DECODE_ONE
from llmc.targets.tvm.target import LIBRARY, PAYLOAD

MAX_BATCH = 256
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


class TvmExecutor(Executor):
    """Executes an exported TVM library on CPU (or, unverified here, a CUDA GPU)."""

    def __init__(self, artifact: Artifact, device: str | None = None, threads: int | None = None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine  # works with a runtime-only TVM too

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
            lib = tvm.runtime.load_module(str(artifact.file(LIBRARY)))
        except Exception as exc:  # TVM raises its own error types
            raise TargetUnavailableError(f"cannot load {artifact.file(LIBRARY)}: {exc}") from exc
        self.vm = VirtualMachine(lib, self.dev)
        weights = artifact.weights()
        self.params = [_to_tvm(weight_part(weights[name], part), self.dev)
                       for name, part in self.payload["param_slots"]]
        self.page_size = int(self.payload["page_size"])
        self._f = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
                   for name in ("add_sequence", "remove_sequence", "popn", "begin_forward", "end_forward")}
        self.kv: Any = None
        self.seq_lens: dict[int, int] = {}
        self.chunk = 0

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
    def kv_spec(self) -> KVSpec:
        c = self.config
        elem = KV_DTYPE_BYTES.get(self.payload["kv_dtype"], 4)
        per_block = 2 * c.num_layers * self.page_size * c.num_kv_heads * c.head_dim * elem
        return KVSpec("paged", self.page_size, per_block, -(-c.max_position // self.page_size),
                      uses_block_tables=False)

    def init_cache(self, num_blocks: int) -> None:
        from tvm_ffi import Shape

        if num_blocks <= 0:
            raise LlmcError(f"the kv cache needs at least one block, got {num_blocks}")
        total = num_blocks * self.page_size
        self.chunk = total
        self.kv = self.vm["create_paged_kv_cache"](
            Shape([min(num_blocks, MAX_BATCH)]), Shape([total]), Shape([total]), Shape([self.page_size]))
        self.seq_lens = {}

    def release(self, seq_id: int) -> None:
        if self.kv is not None and seq_id in self.seq_lens:
            self._f["remove_sequence"](self.kv, int(seq_id))
            del self.seq_lens[seq_id]

    def _sync_sequence(self, seq_id: int, past: int) -> None:
        known = self.seq_lens.get(seq_id)
        if known == past:
            return
        if known is not None and past == 0:
            self.release(seq_id)
            known = None
        if known is None:
            if past != 0:
                raise LlmcError(f"sequence {seq_id} is new to the tvm kv cache but the step says it has "
                                f"{past} cached tokens")
            self._f["add_sequence"](self.kv, int(seq_id))
        elif past < known:
            self._f["popn"](self.kv, int(seq_id), known - past)
        else:
            raise LlmcError(f"sequence {seq_id} holds {known} tokens in the tvm kv cache, the step says {past}")
        self.seq_lens[seq_id] = past

    # -- running ---------------------------------------------------------------------------
    def step(self, batch: StepBatch) -> np.ndarray:
        import tvm
        from tvm_ffi import Shape

        if self.kv is None:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        layout, c = batch.layout, self.config
        batch.check(c.vocab_size, c.max_position)
        ids = batch.token_ids
        if layout.num_tokens > self.chunk:
            raise RequestError(f"a step of {layout.num_tokens} tokens exceeds the cache of {self.chunk} tokens")
        rows = batch.logits_rows
        if rows.size and (rows.min() < 0 or rows.max() >= layout.num_tokens):
            raise RequestError("logits rows are outside the step's tokens")
        for j, seq in enumerate(layout.seq_ids):
            self._sync_sequence(seq, layout.past_len(j))
        dev = self.dev
        self._f["begin_forward"](self.kv, Shape(list(layout.seq_ids)), Shape(list(layout.query_lens)))
        try:
            ids_t = tvm.runtime.tensor(ids.astype(np.int32), dev)
            functions = self.payload["functions"]
            if batch.is_decode and len(layout.seq_ids) == 1 and DECODE_ONE in functions:
                logits, self.kv = self.vm[DECODE_ONE](ids_t, self.kv, self.params)
            elif batch.is_decode and "decode" in functions:
                logits, self.kv = self.vm["decode"](ids_t, self.kv, self.params)
            else:
                rows_t = tvm.runtime.tensor(rows.astype(np.int32), dev)
                logits, self.kv = self.vm["prefill"](ids_t, rows_t, self.kv, self.params)
        finally:
            self._f["end_forward"](self.kv)
        for j, seq in enumerate(layout.seq_ids):
            self.seq_lens[seq] = layout.context_lens[j]
        return np.asarray(logits.numpy(), dtype=np.float32)
