""":class:`CudaTorchExecutor`: the torch target on a CUDA GPU, decode steps replayed from CUDA graphs.

- Decode steps (one token per sequence) of up to 256 sequences are padded to their bucket
  (:mod:`.graphs`) and run the decode program of :mod:`.lowering` (Triton norm, dequantize-matmul and
  paged attention with RoPE inside) from that bucket's CUDA graph, its inputs copied into static
  buffers in place. Larger decode batches, prefill and mixed steps run the torch target's programs
  eagerly (SDPA over the gathered context; packed weights dequantized on the fly for cuBLAS).
- Sampling runs on the device (:mod:`.sampling`); only the token ids (and logprobs asked for) come back.
- :meth:`launch` prepares the step's host inputs (padding, block tables copied) on the caller's thread
  and hands the device work to one worker thread, returning at once: the engine schedules and prepares
  the next step while this one runs, and tokens still being sampled (deferred rows) are copied from the
  previous step's device tokens, never through the host. Every call that touches the device (steps,
  block copies) goes through that worker, in order.
- The cache holds one block more than asked: the scratch block padding rows write to.

Without CUDA the same step functions run on CPU tensors with ``cuda_graphs=False`` under Triton's
interpreter (``TRITON_INTERPRET=1``): how the tests check this path on a machine without a GPU. Anything
else without CUDA is refused with the reason.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import numpy as np
import torch

from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import FutureStep, PendingStep, StepBatch, StepOutput
from llmc.runtime.sampling import SampleRow
from llmc.targets.torch.attention import step_context
from llmc.targets.torch.cuda.attention import decode_splits
from llmc.targets.torch.cuda.graphs import (
    BUCKETS,
    DecodeGraphs,
    HostDecodeInputs,
    StaticDecodeBuffers,
    bucket_for,
    host_decode_inputs,
)
from llmc.targets.torch.cuda.lowering import CUDA_DECODE_OPS, CudaKernelEnv, DecodeContext
from llmc.targets.torch.cuda.qmatmul import sm_count
from llmc.targets.torch.cuda.sampling import sample
from llmc.targets.torch.cuda.triton_dot import INTERPRETING
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.lower import KernelEnv, RopeTables, lower_function


@dataclass
class EagerJob:
    """A step run eagerly: the batch with its block tables copied at launch."""

    batch: StepBatch


@dataclass
class GraphJob:
    """A decode step run in a bucket: its padded host inputs."""

    inputs: HostDecodeInputs


def check_device(device: torch.device, cuda_graphs: bool) -> None:
    """Refuse what cannot run here: CUDA without a GPU, graphs off CUDA, Triton on a CPU uninterpreted."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmcError("device cuda requested but torch sees no CUDA GPU")
        return
    if cuda_graphs:
        raise LlmcError(f"CUDA graphs need a CUDA device, not {device}")
    if not INTERPRETING:
        raise LlmcError(f"the CUDA executor's Triton kernels run on {device} only under Triton's interpreter "
                        "(TRITON_INTERPRET=1, a check of the CUDA path); the torch target's CPU executor runs there")


class CudaTorchExecutor(TorchExecutor):
    """The torch target's executor for ``cuda``: graph-replayed decode buckets, device sampling, early launch."""

    def __init__(self, module: Module, weights: WeightStore, device: str = "cuda", block_size: int = 16,
                 activation_dtype: str = "float32", threads: int | None = None, cuda_graphs: bool = True,
                 buckets: tuple[int, ...] = BUCKETS, kv_cache_dtype: str = "auto") -> None:
        check_device(torch.device(device), cuda_graphs)
        # quant_kernels="dequant" keeps packed weights in llmc's layout, which the Triton kernel reads;
        # the cache is in the activation dtype (another kv_cache_dtype is refused by TorchExecutor)
        super().__init__(module, weights, device=device, block_size=block_size, activation_dtype=activation_dtype,
                         threads=threads, quant_kernels="dequant", kv_cache_dtype=kv_cache_dtype)
        c = self.config
        name = "decode" if "decode" in self.programs else "prefill"
        fn = next(f for f in module if f.name == name)
        sms = sm_count(self.torch_device)
        self.cuda_env = CudaKernelEnv(
            base=KernelEnv(self.act_dtype, RopeTables(c.max_position, self.act_dtype, self.torch_device), self._attend),
            caches=self._layer_cache, block_size=self.block_size, max_position=c.max_position,
            splits=lambda n: decode_splits(n, c.num_kv_heads, sms))
        self.decode_program = lower_function(fn, self.params, self.cuda_env, CUDA_DECODE_OPS)
        self.graphs = DecodeGraphs(self._decode_forward, self.kv_spec().max_blocks_per_seq, self.torch_device,
                                   capture=cuda_graphs, buckets=buckets)
        self.scratch_block = -1
        self._last_tokens: torch.Tensor | None = None
        self.deferred_launches = 0
        """Steps launched with tokens the step before was still sampling (the engine overlapped them)."""
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmc-cuda-step",
                                                             initializer=self._bind_worker)

    # -- cache -------------------------------------------------------------------------------
    def init_cache(self, num_blocks: int) -> None:
        """``num_blocks`` blocks for the runtime plus the scratch block (index ``num_blocks``) padding rows use.

        Asking for the size the cache already has keeps it (and the captured graphs): the runtime never
        reads a slot before writing it."""
        self._on_worker(self._init_cache, num_blocks)

    def _init_cache(self, num_blocks: int) -> None:
        if self.k_cache is not None and num_blocks == self.num_blocks:
            self._last_tokens = None  # the same size again (a benchmark's next run): the graphs stay valid
            return
        self.graphs.clear()  # they point into the old cache
        super().init_cache(num_blocks + 1)
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self._last_tokens = None

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self._on_worker(super().copy_blocks, pairs)

    def device_memory(self) -> tuple[int, int] | None:
        if self.torch_device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.torch_device)
        return int(free), int(total)

    def _layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.k_cache is not None and self.v_cache is not None, "init_cache() first"
        return self.k_cache[layer], self.v_cache[layer]

    # -- steps -------------------------------------------------------------------------------
    def bind_step_thread(self) -> None:
        return None  # steps run on the worker, bound in _bind_worker

    def _bind_worker(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.set_device(self.torch_device)
        else:
            torch.set_num_threads(self.step_threads)

    def _on_worker(self, fn, *args):  # type: ignore[no-untyped-def]
        return self._worker.submit(fn, *args).result()

    def prepare(self, batch: StepBatch) -> GraphJob | EagerJob:
        """The step's host side, done at launch: a bucket's padded inputs, or the batch for the eager path."""
        if self.k_cache is None:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        bucket = bucket_for(len(batch.layout.seq_ids), self.graphs.buckets) if batch.is_decode else None
        if bucket is not None:
            return GraphJob(self._host_inputs(batch, bucket))
        tables = [list(t) for t in batch.block_tables]
        return EagerJob(StepBatch(batch.token_ids.copy(), batch.layout, tables, batch.logits_rows.copy(),
                                  batch.deferred_rows.copy(), batch.deferred_from.copy()))

    def _host_inputs(self, batch: StepBatch, bucket: int) -> HostDecodeInputs:
        return host_decode_inputs(batch, bucket, self.block_size, self.graphs.width, self.scratch_block,
                                  self.config.max_position)

    def step(self, batch: StepBatch) -> np.ndarray:
        if batch.has_deferred:
            raise ValueError("step() takes known tokens; deferred rows come with launch()")
        job = self.prepare(batch)
        return self._on_worker(self._logits_to_host, job)

    def launch(self, batch: StepBatch, rows: list[SampleRow]) -> PendingStep:
        if len(rows) != len(batch.logits_rows):
            raise ValueError(f"{len(rows)} sampling rows for {len(batch.logits_rows)} logits rows")
        job = self.prepare(batch)
        self.deferred_launches += int(batch.has_deferred)
        return FutureStep(self._worker.submit(self._run_and_sample, job, list(rows)))

    @torch.inference_mode()
    def _logits_to_host(self, job: GraphJob | EagerJob) -> np.ndarray:
        logits, _, _ = self._forward(job)
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def _run_and_sample(self, job: GraphJob | EagerJob, rows: list[SampleRow]) -> StepOutput:
        try:
            logits, token_ids, logits_rows = self._forward(job)
            deferred = job.inputs.deferred_rows if isinstance(job, GraphJob) else job.batch.deferred_rows
            extra = None
            if deferred.size:  # penalties count each row's deferred token (known on the device only)
                hit = np.isin(logits_rows, deferred)
                index = torch.from_numpy(logits_rows).to(self.torch_device)
                extra = torch.where(torch.from_numpy(hit).to(self.torch_device), token_ids.index_select(0, index),
                                    torch.full_like(index, -1))
            tokens, logprobs = sample(logits, rows, extra)
            self._last_tokens = tokens
            host = tokens.cpu().numpy()
            return StepOutput(host, logprobs.unpack(host, len(rows)) if logprobs is not None else [None] * len(rows))
        except BaseException:
            self._last_tokens = None  # a step that defers to this one fails too
            raise

    def _forward(self, job: GraphJob | EagerJob) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The step's logits ``[rows, vocab]`` (on the device), its input token ids (device) and logits rows."""
        if isinstance(job, GraphJob):
            inputs = job.inputs
            buffers = self.graphs.buffers_for(inputs.bucket)
            buffers.load(inputs, self._last_tokens)
            return self.graphs.run(inputs.bucket)[: inputs.n], buffers.token_ids, np.arange(inputs.n)
        batch = job.batch
        token_ids = torch.from_numpy(batch.token_ids).to(self.torch_device)
        if batch.has_deferred:
            if self._last_tokens is None:
                raise LlmcError("a step defers tokens to a previous step this executor did not run")
            rows = torch.from_numpy(batch.deferred_rows).to(self.torch_device)
            src = torch.from_numpy(batch.deferred_from).to(self.torch_device)
            token_ids.index_copy_(0, rows, self._last_tokens.index_select(0, src))
        name = "decode" if batch.is_decode and "decode" in self.programs else "prefill"
        ctx = step_context(batch, self.block_size, self.config.max_position, self.torch_device)
        logits_index = torch.from_numpy(batch.logits_rows).to(self.torch_device)
        return self.run_program(name, token_ids, logits_index, ctx), token_ids, batch.logits_rows

    def _decode_forward(self, buffers: StaticDecodeBuffers) -> torch.Tensor:
        """The decode program over a bucket's buffers (what each bucket's graph captures)."""
        ctx = DecodeContext(buffers.positions, buffers.slot_mapping, buffers.block_tables, buffers.context_lens)
        return self.execute(self.decode_program, buffers.token_ids, buffers.logits_index, ctx)

    def close(self) -> None:
        """Stop the worker (steps already launched finish first)."""
        self._worker.shutdown(wait=True)
