"""Runs the ONNX graph over a slot KV cache: one slot (a whole sequence's KV) per sequence.

The cache of layer ``l`` is one buffer per key/value, ``[slots, kv_heads, capacity, head_dim]``.
On the CPU the capacity starts small and doubles (up to the slot size) as sequences grow: the
CPU ``GroupQueryAttention`` kernel's cost grows with the buffer length, not only the context.
A step's sequences are split into calls that ``GroupQueryAttention`` accepts (all one-token
rows together; first prompts of one length together; each prefill chunk after a cached prefix
alone). A call whose sequences sit in consecutive slots binds that slice of the buffer as both
``past_key_values`` and ``present`` (IO binding by pointer), so GQA appends in place and nothing
is copied; other calls on the CPU gather their slots into a scratch buffer and scatter only the
new entries back. On CUDA the buffers live on the GPU and calls are split into runs of
consecutive slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.onnx.lower import past_name, present_name
from llmc.targets.onnx.session import create_session, parse_device
from llmc.targets.slots import SlotBuffers, slot_capacity, slot_ids

INITIAL_CAPACITY = 256
MAX_BINDINGS = 64


@dataclass
class Call:
    """One session run: sequence indices of the step, ordered by slot."""

    seqs: list[int]
    contiguous: bool


def plan_calls(query_lens: tuple[int, ...], past_lens: list[int], slots: list[int],
               contiguous_only: bool) -> list[Call]:
    """Group a step's sequences into runs GroupQueryAttention can take in one call."""
    groups: list[list[int]] = []
    decode = [j for j, q in enumerate(query_lens) if q == 1]
    if decode:
        groups.append(decode)
    prompts: dict[int, list[int]] = {}
    for j, q in enumerate(query_lens):
        if q > 1 and past_lens[j] == 0:
            prompts.setdefault(q, []).append(j)
        elif q > 1:
            groups.append([j])  # a chunk after a cached prefix: batch 1 only
    groups.extend(prompts.values())
    calls: list[Call] = []
    for group in groups:
        group = sorted(group, key=lambda j: slots[j])
        runs: list[list[int]] = [[group[0]]]
        for j in group[1:]:
            if slots[j] == slots[runs[-1][-1]] + 1:
                runs[-1].append(j)
            else:
                runs.append([j])
        if len(runs) == 1 or not contiguous_only:
            calls.append(Call(group, len(runs) == 1))
        else:
            calls.extend(Call(run, True) for run in runs)
    return calls


class OnnxExecutor(Executor):
    """An ONNX Runtime session plus the slot KV cache it reads and appends to."""

    def __init__(self, model: Path, config: ModelConfig, device: str = "cpu", threads: int | None = None,
                 inter_op_threads: int | None = None, kv_capacity: int | None = None,
                 optimization: str = "all", tensorrt: bool | None = None) -> None:
        self.config = config
        self.device = device
        self.kind, self.device_id = parse_device(device)
        self.session = create_session(model, device, threads, inter_op_threads, optimization, tensorrt)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.cache = SlotBuffers(config, slot_capacity(config, kv_capacity), self._zeros, growable=self.kind == "cpu")
        self.capacity = self.cache.capacity
        self._bindings: dict[tuple[int, int], Any] = {}  # (first slot, batch) -> IOBinding with the kv bound
        self._bound_generation = -1  # the cache allocation those bindings point into

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        if self.kind == "cpu":
            return np.zeros(shape, dtype=np.float32)
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self.device_id)

    # -- cache ---------------------------------------------------------------------------
    def kv_spec(self) -> KVSpec:
        return self.cache.spec()

    def init_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` slots (on the CPU for a short context first; they grow on demand)."""
        self.cache.allocate(num_blocks, min(self.capacity, INITIAL_CAPACITY) if self.kind == "cpu" else self.capacity)

    @property
    def slot_bytes(self) -> int:
        return 4 * int(np.prod(self.cache.slot_shape))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if self.kind != "cpu":
            raise LlmcError("copying kv slots is implemented for the CPU cache only")
        self.cache.copy(pairs)

    def _pointer(self, store: Any, slot: int) -> int:
        base = store.ctypes.data if self.kind == "cpu" else store.data_ptr()
        return int(base) + slot * self.slot_bytes

    # -- running -------------------------------------------------------------------------
    def _slots(self, batch: StepBatch) -> list[int]:
        self.cache.require_allocated()
        slots = slot_ids(batch, self.cache.num_slots, self.capacity, "onnx", " (load option kv_capacity)",
                         f"load option kv_capacity, at most the model context {self.config.max_position}")
        self.cache.ensure(max(batch.layout.context_lens))
        if self.cache.generation != self._bound_generation:
            self._bindings.clear()
            self._bound_generation = self.cache.generation
        return slots

    def step(self, batch: StepBatch) -> np.ndarray:
        batch.check(self.config.vocab_size, self.config.max_position)
        layout = batch.layout
        slots = self._slots(batch)
        past = [layout.past_len(j) for j in range(len(layout.seq_ids))]
        calls = plan_calls(layout.query_lens, past, slots, contiguous_only=self.kind != "cpu")
        starts = layout.starts()
        row_seq = np.repeat(np.arange(len(layout.seq_ids)), layout.query_lens)
        want = batch.logits_rows
        out = np.empty((len(want), self.config.vocab_size), dtype=np.float32)
        for call in calls:
            offsets = {}
            acc = 0
            for j in call.seqs:
                offsets[j] = acc
                acc += layout.query_lens[j]
            picked = [(i, offsets[int(row_seq[r])] + int(r) - starts[int(row_seq[r])])
                      for i, r in enumerate(want) if int(row_seq[r]) in offsets]
            logits = self._run(batch, call, slots, past, [local for _, local in picked])
            if picked:
                out[[i for i, _ in picked]] = logits
        return out

    def _run(self, batch: StepBatch, call: Call, slots: list[int], past: list[int], rows: list[int]) -> np.ndarray:
        layout = batch.layout
        starts = layout.starts()
        ids = np.concatenate([batch.token_ids[starts[j]:starts[j] + layout.query_lens[j]] for j in call.seqs])
        context = [layout.context_lens[j] for j in call.seqs]
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(ids, dtype=np.int64),
            "logits_index": np.asarray(rows, dtype=np.int64),
            "seqlens_k": np.asarray(context, dtype=np.int32) - 1,
            "total_sequence_length": np.asarray(max(context), dtype=np.int32),
        }
        if "positions" in self.input_names:
            feeds["positions"] = np.concatenate(
                [np.arange(past[j], layout.context_lens[j], dtype=np.int64) for j in call.seqs])
        scratch = None if call.contiguous else self._gather(call, slots, past, max(context))
        key = (slots[call.seqs[0]], len(call.seqs))
        binding = self._bindings.get(key) if scratch is None else None
        if binding is None:
            binding = self._bind_cache(call, slots, scratch)
            if scratch is None:
                if len(self._bindings) >= MAX_BINDINGS:
                    self._bindings.clear()
                self._bindings[key] = binding
        for name, value in feeds.items():
            if name in self.input_names:
                binding.bind_cpu_input(name, value)
        logits = np.empty((len(rows), self.config.vocab_size), dtype=np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        if scratch is not None:
            self._scatter(scratch, call, slots, past, context)
        return logits

    def _bind_cache(self, call: Call, slots: list[int], scratch: dict[str, list[np.ndarray]] | None) -> Any:
        """An IOBinding with every layer's past and present kv bound to one buffer (slots or scratch)."""
        binding = self.session.io_binding()
        device = "cpu" if self.kind == "cpu" else "cuda"
        for layer in range(self.config.num_layers):
            for kind, stores in (("key", self.cache.keys), ("value", self.cache.values)):
                if scratch is None:
                    ptr = self._pointer(stores[layer], slots[call.seqs[0]])
                    shape: tuple[int, ...] = (len(call.seqs), *self.cache.slot_shape)
                else:
                    buf = scratch[kind][layer]
                    ptr, shape = buf.ctypes.data, buf.shape
                binding.bind_input(past_name(layer, kind), device, self.device_id, np.float32, shape, ptr)
                binding.bind_output(present_name(layer, kind), device, self.device_id, np.float32, shape, ptr)
        return binding

    def _gather(self, call: Call, slots: list[int], past: list[int], length: int) -> dict[str, list[np.ndarray]]:
        """Copy the cached prefixes of a call's slots into ``[batch, kv_heads, length, head_dim]``."""
        heads, _, dim = self.cache.slot_shape
        shape = (len(call.seqs), heads, length, dim)
        scratch: dict[str, list[np.ndarray]] = {"key": [], "value": []}
        for kind, stores in (("key", self.cache.keys), ("value", self.cache.values)):
            for store in stores:
                buf = np.empty(shape, dtype=np.float32)
                for b, j in enumerate(call.seqs):
                    buf[b, :, : past[j]] = store[slots[j], :, : past[j]]
                scratch[kind].append(buf)
        return scratch

    def _scatter(self, scratch: dict[str, list[np.ndarray]], call: Call, slots: list[int], past: list[int],
                 context: list[int]) -> None:
        """Write the entries a call appended back into the slots."""
        for kind, stores in (("key", self.cache.keys), ("value", self.cache.values)):
            for store, buf in zip(stores, scratch[kind], strict=True):
                for b, j in enumerate(call.seqs):
                    store[slots[j], :, past[j]: context[b]] = buf[b, :, past[j]: context[b]]
