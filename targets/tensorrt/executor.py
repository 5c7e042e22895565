"""Runs the TensorRT-ready graph over a slot KV cache, with a TensorRT engine or ONNX Runtime.

The cache of layer ``l`` is one torch tensor per key/value, ``[slots, kv_heads, capacity,
head_dim]`` (on the GPU for TensorRT, in host memory for ONNX Runtime); a sequence owns one
slot. A step's sequences are split into calls (all one-token rows together; each longer chunk
alone, so a long prompt does not pad a decode batch). A call gathers its rows' past KV into
``[batch, kv_heads, past, head_dim]`` (``past`` = the longest, at least 1; shorter rows are
masked by ``past_lengths``), runs the graph, and writes each row's new entries from ``present``
back into its slot. The same code drives both runners, so the ONNX Runtime path checks the
exact inputs the TensorRT engine receives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError, RequestError
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.onnx.lower import past_name, present_name
from llmc.targets.slots import SlotBuffers, slot_capacity, slot_ids
from llmc.targets.tensorrt.engine import Profile

INITIAL_CAPACITY = 256


class Runner(Protocol):
    """Runs the graph once: named input tensors in, named output tensors out."""

    device: torch.device

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]: ...


class OrtRunner:
    """The TensorRT-ready ONNX graph under ONNX Runtime's CPU execution provider (verification)."""

    def __init__(self, model: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.device = torch.device("cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        # ONNX Runtime fuses DequantizeLinear(INT4) -> MatMul into MatMulNBits; its default
        # accuracy level 4 quantizes the activations to int8. Level 0 keeps float32 arithmetic,
        # so the run checks the graph's own numbers.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        arrays = {name: t.contiguous().numpy() for name, t in feeds.items()}
        results = self.session.run(outputs, arrays)
        return {name: torch.from_numpy(np.asarray(r)) for name, r in zip(outputs, results, strict=True)}


class TrtRunner:
    """A deserialized TensorRT engine: one execution context, tensors bound by address, one stream."""

    def __init__(self, engine_bytes: bytes, device_index: int = 0) -> None:
        import tensorrt as trt

        self.trt = trt
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise LlmcError("TensorRT could not deserialize the engine in this artifact (see the TensorRT log)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        keep = []
        for name, tensor in feeds.items():
            t = tensor.to(self.device, self._torch_dtype(name), non_blocking=True).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        results = {}
        for name in outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise LlmcError(f"TensorRT could not infer the shape of output {name!r}: {shape}")
            out = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LlmcError("TensorRT execution failed (see the TensorRT log)")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        del keep
        return results


class TrtGraphExecutor(Executor):
    """The slot KV cache plus the calls that feed the graph (see the module docstring)."""

    def __init__(self, runner: Runner, config: ModelConfig, device: str, profile: Profile,
                 kv_capacity: int | None = None, backend: str = "tensorrt") -> None:
        self.runner = runner
        self.config = config
        self.device = device
        self.backend = backend
        self.profile = profile
        capacity = slot_capacity(config, kv_capacity, profile.past[2] + 1)  # every past fits the profile
        self.cache = SlotBuffers(config, capacity, self._zeros)
        self.capacity = self.cache.capacity
        self.outputs = ["logits"] + [present_name(layer, kind) for layer in range(config.num_layers)
                                     for kind in ("key", "value")]

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.runner.device)

    # -- cache ---------------------------------------------------------------------------
    def kv_spec(self) -> KVSpec:
        return self.cache.spec()

    def init_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` slots (host memory starts short and grows; the GPU gets full capacity)."""
        on_cpu = self.runner.device.type == "cpu"
        self.cache.allocate(num_blocks, min(self.capacity, INITIAL_CAPACITY) if on_cpu else self.capacity)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.cache.copy(pairs)

    # -- running -------------------------------------------------------------------------
    def _slots(self, batch: StepBatch) -> list[int]:
        layout = batch.layout
        self.cache.require_allocated()
        slots = slot_ids(batch, self.cache.num_slots, self.capacity, "tensorrt", "",
                         f"load option kv_capacity; the engine profile takes a past of at most "
                         f"{self.profile.past[2]}, the model context is {self.config.max_position}")
        for j, seq in enumerate(layout.seq_ids):
            if layout.query_lens[j] > self.profile.sequence[2]:
                raise RequestError(f"sequence {seq}: {layout.query_lens[j]} new tokens in one step; the engine profile "
                                   f"takes at most {self.profile.sequence[2]} (target option max_sequence)")
        self.cache.ensure(max(layout.context_lens))
        return slots

    def plan_calls(self, query_lens: tuple[int, ...]) -> list[list[int]]:
        """Sequence indices per call: one-token rows together (up to max batch), longer chunks alone."""
        decode = [j for j, q in enumerate(query_lens) if q == 1]
        limit = self.profile.batch[2]
        calls = [decode[i:i + limit] for i in range(0, len(decode), limit)]
        calls.extend([j] for j, q in enumerate(query_lens) if q > 1)
        return calls

    def step(self, batch: StepBatch) -> np.ndarray:
        batch.check(self.config.vocab_size, self.config.max_position)
        layout = batch.layout
        slots = self._slots(batch)
        starts = layout.starts()
        row_seq = np.repeat(np.arange(len(layout.seq_ids)), layout.query_lens)
        want = batch.logits_rows
        out = np.empty((len(want), self.config.vocab_size), dtype=np.float32)
        for seqs in self.plan_calls(layout.query_lens):
            width = max(layout.query_lens[j] for j in seqs)
            member = {j: b for b, j in enumerate(seqs)}
            picked = [(i, member[int(row_seq[r])] * width + int(r) - starts[int(row_seq[r])])
                      for i, r in enumerate(want) if int(row_seq[r]) in member]
            logits = self._run(batch, seqs, slots, width, [local for _, local in picked])
            if picked:
                out[[i for i, _ in picked]] = logits
        return out

    def _run(self, batch: StepBatch, seqs: list[int], slots: list[int], width: int, rows: list[int]) -> np.ndarray:
        layout = batch.layout
        starts = layout.starts()
        n = len(seqs)
        past = [layout.past_len(j) for j in seqs]
        span = max(1, max(past))  # at least one (masked) entry: no zero-sized tensors
        ids = torch.zeros((n, width), dtype=torch.int64)
        positions = torch.zeros((n, width), dtype=torch.int64)
        for b, j in enumerate(seqs):
            q = layout.query_lens[j]
            ids[b, :q] = torch.from_numpy(batch.token_ids[starts[j]:starts[j] + q])
            positions[b, :q] = torch.arange(past[b], past[b] + q)
        feeds: dict[str, torch.Tensor] = {
            "input_ids": ids, "positions": positions,
            "past_lengths": torch.tensor(past, dtype=torch.int64),
            "logits_index": torch.tensor(rows if rows else [0], dtype=torch.int64),
        }
        index = torch.tensor([slots[j] for j in seqs], device=self.runner.device)
        for layer in range(self.config.num_layers):
            for kind, stores in (("key", self.cache.keys), ("value", self.cache.values)):
                feeds[past_name(layer, kind)] = stores[layer].index_select(0, index)[:, :, :span]
        results = self.runner.run(feeds, self.outputs)
        for layer in range(self.config.num_layers):
            for kind, stores in (("key", self.cache.keys), ("value", self.cache.values)):
                present = results[present_name(layer, kind)]
                for b, j in enumerate(seqs):
                    q = layout.query_lens[j]
                    stores[layer][slots[j], :, past[b]:past[b] + q] = present[b, :, span:span + q]
        logits = results["logits"].float().cpu().numpy()
        return logits[: len(rows)]
