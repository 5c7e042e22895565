"""Runs IR functions with torch ops over a paged KV cache, or as llmc's native step program.

At load, each function is lowered once into a flat list of instructions (a kernel plus
operand slots, :mod:`llmc.targets.torch.lower`); a step then only walks that list. Attention
(:mod:`llmc.targets.torch.attention`) gathers each sequence's cached keys through its block
table into a padded batch and calls scaled_dot_product_attention with a causal, length-aware
mask, so prefill chunks and decode tokens of many sequences share one call per layer.

On CPU, when every matmul weight runs on llmc's int8-activation kernels and the mode is not
deterministic, each function is also lowered to the native step program
(:mod:`llmc.targets.torch.native`): a step is then one C++ call (no per-op framework work) on
one persistent thread pool, and the key cache holds each block's keys transposed, which only
native steps read. ``step="ops"`` keeps the torch ops.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.torch import qkernels
from llmc.targets.torch.attention import StepContext, paged_attention, step_context
from llmc.targets.torch.invariant import invariant_attend, invariant_step
from llmc.targets.torch.lower import TORCH_OPS, KernelEnv, Program, RopeTables, lower_function
from llmc.targets.torch.native import NativeStep, Unsupported, lower_native
from llmc.targets.torch.weights import (
    PackedWeight,
    TorchWeight,
    int4pack_is_fast,
    release_transients_to_os,
    to_torch_weight,
)

log = logging.getLogger(__name__)

STEP_MODES = ("auto", "ops")
"""``auto``: the native step program where it applies; ``ops``: torch ops per IR op."""
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
"""``auto``: float16 where the native step program runs (half the bytes attention reads, as llama.cpp
keeps its cache), else the activation dtype; an explicit dtype other than the activations' needs the
native program (float16 or float32 under float32 activations)."""


class TorchExecutor(Executor):
    """Executes an IR module with torch on ``device``."""

    def __init__(
        self,
        module: Module,
        weights: WeightStore,
        device: str = "cpu",
        block_size: int = 16,
        activation_dtype: str = "float32",
        threads: int | None = None,
        deterministic: bool = False,
        quant_kernels: str = "auto",
        step: str = "auto",
        kv_cache_dtype: str = "auto",
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LlmcError("device cuda requested but torch sees no CUDA GPU")
        if step not in STEP_MODES:
            raise LlmcError(f"step must be one of {', '.join(STEP_MODES)}, not {step!r}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LlmcError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
        self.step_threads = threads or torch.get_num_threads()
        with serial_torch():
            self._load(module, weights, device, block_size, activation_dtype, deterministic, quant_kernels)
            self._lower_native(step == "auto")
        self.kv_dtype = self._kv_dtype(kv_cache_dtype)
        if threads:
            torch.set_num_threads(threads)

    def _load(self, module: Module, weights: WeightStore, device: str, block_size: int, activation_dtype: str,
              deterministic: bool, quant_kernels: str) -> None:
        TORCH_OPS.check_module(module)  # refuse an op before any weight is converted
        release_transients_to_os()  # load-time copies and per-layer float weights must not pile up in the heap
        self.module = module
        self.config = ModelConfig.from_dict(module.config)
        self.device = device
        self.torch_device = torch.device(device)
        self.block_size = block_size
        self.act_dtype = getattr(torch, activation_dtype)
        self.deterministic = deterministic  # batch-invariant kernels (targets/torch/invariant.py)
        self.params: dict[str, TorchWeight] = {
            name: to_torch_weight(weights[name], self.torch_device) for name in sorted(module.referenced_params())
        }
        if quant_kernels not in ("auto", "torch", "dequant"):
            raise LlmcError(f"quant_kernels must be 'auto', 'torch' or 'dequant', not {quant_kernels!r}")
        packed = [w for w in self.params.values() if isinstance(w, PackedWeight)]
        # auto: llmc's C++ kernel on the llmc layout for few rows (faster than torch's int4/int8 kernels
        # on AVX2, docs/performance.md "CPU quantized kernels"), else torch's kernels where they are fast
        llmc_kernels = quant_kernels == "auto" and bool(packed) and self.torch_device.type == "cpu" \
            and self.act_dtype == torch.float32 and qkernels.available()
        for weight in packed:
            weight.cpu_kernel = llmc_kernels
        if quant_kernels != "dequant" and not llmc_kernels:  # dequant: every layer dequantized on the fly
            self._prepare_kernels(module, int4pack=quant_kernels == "torch" or int4pack_is_fast())
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.num_blocks = 0
        env = KernelEnv(self.act_dtype, RopeTables(self.config.max_position, self.act_dtype, self.torch_device),
                        self._attend)
        self.programs: dict[str, Program] = {fn.name: lower_function(fn, self.params, env) for fn in module}

    def _lower_native(self, wanted: bool) -> None:
        """Lower every function to the native step program where it applies (else keep torch ops;
        :attr:`native_reason` says why)."""
        self.native: dict[str, NativeStep] | None = None
        self.native_reason: str | None = "step=ops" if not wanted else None
        if wanted:
            if self.deterministic:
                self.native_reason = "deterministic mode runs the batch-invariant torch kernels"
            elif self.torch_device.type != "cpu" or self.act_dtype != torch.float32:
                self.native_reason = "native steps run float32 activations on the CPU"
            else:
                try:
                    self.native = {fn.name: lower_native(fn, self.params, self.config) for fn in self.module}
                except Unsupported as exc:
                    self.native_reason = str(exc)
        if self.native_reason:
            log.info("torch executor runs torch ops per IR op: %s", self.native_reason)
        self.block_major = self.native is not None and self.block_size % 16 == 0

    def _kv_dtype(self, name: str) -> torch.dtype:
        """The cache's dtype for the ``kv_cache_dtype`` option (see :data:`KV_CACHE_DTYPES`)."""
        if name == "auto":
            return torch.float16 if self.native is not None else self.act_dtype
        dtype = getattr(torch, name)
        if dtype == self.act_dtype or (self.native is not None and dtype in (torch.float16, torch.float32)):
            return dtype
        why = "the native step program runs float16 or float32 caches" if self.native is not None \
            else f"torch ops keep the cache in the activation dtype ({self.native_reason})"
        raise LlmcError(f"kv_cache_dtype={name} is not available with {str(self.act_dtype).removeprefix('torch.')} "
                        f"activations here: {why}")

    def _prepare_kernels(self, module: Module, int4pack: bool) -> None:
        """Move packed weights read only by ``linear`` into torch's low-precision kernel layouts."""
        uses: dict[str, set[str]] = {}
        for fn in module:
            for node in fn.nodes:
                for value in node.inputs:
                    if value.node.op == "param":
                        uses.setdefault(str(value.node.attrs["name"]), set()).add(node.op)
        for name, weight in self.params.items():
            ops = uses.get(name, set())
            if not isinstance(weight, PackedWeight) or self.act_dtype != torch.float32 or "linear" not in ops:
                continue
            # int8 kernel codes also serve embedding rows (a tied head); int4 kernel layouts do not
            if ops == {"linear"} or (ops <= {"linear", "embedding"} and weight.kernel_name() == "int8pack"):
                weight.prepare_linear(int4pack)

    # -- cache ---------------------------------------------------------------------------
    def kv_spec(self) -> KVSpec:
        c = self.config
        elem = torch.tensor([], dtype=self.kv_dtype).element_size()
        per_block = 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem
        max_blocks = -(-c.max_position // self.block_size)
        return KVSpec("paged", self.block_size, per_block, max_blocks)

    def init_cache(self, num_blocks: int) -> None:
        c = self.config
        shape = (c.num_layers, num_blocks * self.block_size, c.num_kv_heads, c.head_dim)
        with serial_torch():  # often called on a thread that will not run the steps
            self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.torch_device)
            self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.torch_device)
        self.num_blocks = num_blocks

    def bind_step_thread(self) -> None:
        torch.set_num_threads(self.step_threads)

    def device_peak_bytes(self) -> int | None:
        if self.torch_device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.torch_device))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        assert self.k_cache is not None and self.v_cache is not None
        bs = self.block_size
        for src, dst in pairs:
            for cache in (self.k_cache, self.v_cache):
                cache[:, dst * bs : (dst + 1) * bs] = cache[:, src * bs : (src + 1) * bs]

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, scale: float
    ) -> torch.Tensor:
        assert self.k_cache is not None and self.v_cache is not None, "init_cache() first"
        attend = invariant_attend if self.deterministic else paged_attention
        return attend(self.k_cache[layer], self.v_cache[layer], q, k, v, ctx, scale)

    # -- running -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: StepBatch) -> np.ndarray:
        if self.k_cache is None:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        batch.check(self.config.vocab_size, self.config.max_position)
        if self.deterministic:
            return invariant_step(self, batch)
        name = "decode" if batch.is_decode and "decode" in self.programs else "prefill"
        if self.native is not None:
            return self.native[name].run(batch, self.k_cache, self.v_cache, self.block_size, self.step_threads,
                                         self.block_major)
        ctx = step_context(batch, self.block_size, self.config.max_position, self.torch_device)
        token_ids = torch.from_numpy(batch.token_ids).to(self.torch_device)
        logits_index = torch.from_numpy(batch.logits_rows).to(self.torch_device)
        return self.run_program(name, token_ids, logits_index, ctx).float().cpu().numpy()

    def run_program(self, name: str, token_ids: torch.Tensor, logits_index: torch.Tensor,
                    ctx: StepContext) -> torch.Tensor:
        """Run the lowered function ``name`` on prepared inputs; returns its logits tensor."""
        return self.execute(self.programs[name], token_ids, logits_index, ctx)

    @staticmethod
    def execute(program: Program, token_ids: torch.Tensor, logits_index: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Walk ``program``'s instructions over the step's inputs (``ctx``: what its kernels read)."""
        env: list[Any] = [None] * program.n_slots
        for slot, value in program.constants:
            env[slot] = value
        feeds = {"input_ids": token_ids, "positions": ctx.positions, "logits_index": logits_index, "kv_cache": None}
        for input_name, slot in program.inputs.items():
            env[slot] = feeds[input_name]
        for instr in program.instrs:
            result = instr.kernel([env[i] for i in instr.args], ctx)
            if instr.n_out == 1:
                env[instr.out] = result
            else:
                env[instr.out : instr.out + instr.n_out] = list(result)
        return env[program.outputs["logits"]]


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """Run torch work (loading, cache allocation) on this thread without an OpenMP team.

    Steps usually run on another thread (the engine's). With libgomp, once two OS threads have
    each run parallel regions, both get slower: on a 2-core machine, decode steps on the engine
    thread went from 27 to 62 ms after the loading thread had run one parallel matmul. Loading
    serially keeps the stepping thread's team the only one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
