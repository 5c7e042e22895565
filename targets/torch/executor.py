"""Runs IR functions with torch ops over a paged KV cache.

At load, each function is lowered once into a flat list of instructions (a kernel plus
operand slots); a step then only walks that list. Attention gathers each sequence's cached
keys through its block table into a padded batch and calls scaled_dot_product_attention with
a causal, length-aware mask, so prefill chunks and decode tokens of many sequences share
one call per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.ir.graph import Function, Module, Node
from llmc.compiler.ir.rope import cos_sin
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor, KVSpec, StepBatch
from llmc.targets.torch import qkernels
from llmc.targets.torch.invariant import invariant_attend, invariant_step
from llmc.targets.torch.weights import (
    PackedWeight,
    TorchWeight,
    int4pack_is_fast,
    linear,
    release_transients_to_os,
    to_torch_weight,
)


@dataclass
class StepContext:
    """Per-step tensors shared by every layer."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    ctx_slots: torch.Tensor  # [B, max_ctx] flat cache slots of each sequence's context
    q_index: torch.Tensor  # [B, max_q] row of each padded query in the flat batch
    out_index: torch.Tensor  # [T] row of each flat token in the padded [B * max_q]
    mask: torch.Tensor  # [B, 1, max_q, max_ctx] True where attention is allowed
    rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]]


Kernel = Callable[[list[Any], StepContext], Any]


@dataclass
class Instr:
    kernel: Kernel
    args: list[int]
    out: int
    n_out: int


@dataclass
class Program:
    """A lowered function: instructions over numbered value slots."""

    instrs: list[Instr]
    inputs: dict[str, int]
    constants: list[tuple[int, Any]]
    outputs: dict[str, int]
    n_slots: int


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
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LlmcError("device cuda requested but torch sees no CUDA GPU")
        self.step_threads = threads or torch.get_num_threads()
        with serial_torch():
            self._load(module, weights, device, block_size, activation_dtype, deterministic, quant_kernels)
        if threads:
            torch.set_num_threads(threads)

    def _load(self, module: Module, weights: WeightStore, device: str, block_size: int, activation_dtype: str,
              deterministic: bool, quant_kernels: str) -> None:
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
        self.programs = {fn.name: self._lower(fn) for fn in module}
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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
        elem = torch.tensor([], dtype=self.act_dtype).element_size()
        per_block = 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem
        max_blocks = -(-c.max_position // self.block_size)
        return KVSpec("paged", self.block_size, per_block, max_blocks)

    def init_cache(self, num_blocks: int) -> None:
        c = self.config
        shape = (c.num_layers, num_blocks * self.block_size, c.num_kv_heads, c.head_dim)
        with serial_torch():  # often called on a thread that will not run the steps
            self.k_cache = torch.zeros(shape, dtype=self.act_dtype, device=self.torch_device)
            self.v_cache = torch.zeros(shape, dtype=self.act_dtype, device=self.torch_device)
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

    # -- lowering ------------------------------------------------------------------------
    def _lower(self, fn: Function) -> Program:
        slots: dict[int, int] = {}
        program: list[Instr] = []
        inputs: dict[str, int] = {}
        next_slot = 0
        constants: list[tuple[int, Any]] = []
        for node in fn.nodes:
            base = next_slot
            slots[id(node)] = base
            next_slot += len(node.out_types)
            if node.op == "input":
                inputs[str(node.attrs["name"])] = base
            elif node.op == "param":
                constants.append((base, self.params[str(node.attrs["name"])]))
            else:
                args = [slots[id(v.node)] + v.index for v in node.inputs]
                program.append(Instr(self._kernel(node), args, base, len(node.out_types)))
        outputs = {name: slots[id(v.node)] + v.index for name, v in fn.outputs.items()}
        return Program(program, inputs, constants, outputs, next_slot)

    def _kernel(self, node: Node) -> Kernel:
        a = node.attrs
        op = node.op
        act = self.act_dtype
        if op == "embedding":
            return lambda x, c: _embedding(x[0], x[1]).to(act)
        if op == "rms_norm":
            eps = float(a["eps"])  # type: ignore[arg-type]
            return lambda x, c: _rms_norm(x[0], x[1], eps)
        if op == "add_rms_norm":
            eps = float(a["eps"])  # type: ignore[arg-type]

            def add_rms_norm(x: list[Any], c: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
                total = x[0] + x[1]
                return _rms_norm(total, x[2], eps), total

            return add_rms_norm
        if op == "linear":
            return lambda x, c: linear(x[0], x[1])
        if op == "split":
            sizes = list(a["sizes"])  # type: ignore[call-overload]
            return lambda x, c: x[0].split_with_sizes(sizes, dim=-1)  # no Python wrapper: ~2x cheaper
        if op == "split_heads":
            heads, hd = int(a["heads"]), int(a["head_dim"])  # type: ignore[call-overload]
            return lambda x, c: x[0].view(x[0].shape[0], heads, hd)
        if op == "merge_heads":
            return lambda x, c: x[0].reshape(x[0].shape[0], -1)
        if op == "rope":
            key = _rope_key(a)
            return lambda x, c: self._rope(x[0], c, key, a)
        if op in ("attention", "rope_attention"):
            return self._attention_kernel(node)
        if op == "silu":
            return lambda x, c: F.silu(x[0])
        if op == "mul":
            return lambda x, c: x[0] * x[1]
        if op == "add":
            return lambda x, c: x[0] + x[1]
        if op == "swiglu":

            def swiglu(x: list[Any], c: StepContext) -> torch.Tensor:
                gate, up = x[0].chunk(2, dim=-1)
                return F.silu(gate) * up

            return swiglu
        if op == "gather_rows":
            return lambda x, c: x[0].index_select(0, x[1])
        raise LlmcError(f"the torch target cannot lower op {op!r}")

    def _rope_table(self, key: tuple, attrs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._rope_tables:
            cos, sin = cos_sin(np.arange(self.config.max_position), attrs)
            self._rope_tables[key] = (
                torch.from_numpy(cos).to(self.act_dtype).to(self.torch_device),
                torch.from_numpy(sin).to(self.act_dtype).to(self.torch_device),
            )
        return self._rope_tables[key]

    def _rope(self, x: torch.Tensor, ctx: StepContext, key: tuple, attrs: dict[str, Any]) -> torch.Tensor:
        style, rot = str(attrs["style"]), int(attrs["rotary_dim"])
        if key not in ctx.rope:
            cos, sin = self._rope_table(key, attrs)
            cos, sin = cos[ctx.positions][:, None, :], sin[ctx.positions][:, None, :]
            if style == "half" and rot == x.shape[-1]:  # full-width tables for the 5-kernel form below
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            ctx.rope[key] = (cos, sin)
        cos, sin = ctx.rope[key]
        if style == "half" and rot == x.shape[-1]:
            # x*cos + rotate_half(x)*sin: bitwise the same as _apply_rope's half style, fewer kernels
            a, b = x[..., : rot // 2], x[..., rot // 2 :]
            return x * cos + torch.cat((-b, a), dim=-1) * sin
        return _apply_rope(x, cos, sin, style, rot)

    def _attention_kernel(self, node: Node) -> Kernel:
        a = node.attrs
        layer, scale = int(a["layer"]), float(a["scale"])  # type: ignore[call-overload,arg-type]
        fused_rope = node.op == "rope_attention"
        key = _rope_key(a) if fused_rope else ()

        def attention(x: list[Any], ctx: StepContext) -> torch.Tensor:
            q, k, v = x[0], x[1], x[2]
            if fused_rope:
                q = self._rope(q, ctx, key, a)
                k = self._rope(k, ctx, key, a)
            return self._attend(layer, q, k, v, ctx, scale)

        return attention

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext, scale: float
    ) -> torch.Tensor:
        assert self.k_cache is not None and self.v_cache is not None, "init_cache() first"
        if self.deterministic:
            return invariant_attend(self.k_cache[layer], self.v_cache[layer], q, k, v, ctx, scale)
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc.index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        keys = kc[ctx.ctx_slots].transpose(1, 2)  # (B, Hkv, ctx, D)
        values = vc[ctx.ctx_slots].transpose(1, 2)
        hq, hkv = q.shape[1], k.shape[1]
        decode = ctx.q_index.shape[1] == 1 and ctx.q_index.shape[0] == q.shape[0]  # one query per sequence
        queries = (q[:, None] if decode else q[ctx.q_index]).transpose(1, 2)  # (B, Hq, max_q, D)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=ctx.mask, scale=scale,
                                             enable_gqa=hq != hkv)
        out = out.transpose(1, 2).reshape(-1, hq, q.shape[2])  # (B * max_q, Hq, D)
        return out if decode else out.index_select(0, ctx.out_index)

    # -- running -------------------------------------------------------------------------
    def _context(self, batch: StepBatch) -> StepContext:
        """The step's index tensors, built with whole-array numpy (no per-token Python)."""
        layout, bs, dev = batch.layout, self.block_size, self.torch_device
        qlens = np.asarray(layout.query_lens, dtype=np.int64)
        clens = np.asarray(layout.context_lens, dtype=np.int64)
        past = clens - qlens
        n_seq, max_q, max_ctx = len(qlens), int(qlens.max()), int(clens.max())
        starts = np.cumsum(qlens) - qlens
        seq_of_row = np.repeat(np.arange(n_seq), qlens)
        offsets = np.arange(int(qlens.sum())) - starts[seq_of_row]  # index of each token in its chunk
        positions = past[seq_of_row] + offsets
        if positions.size and positions.max() >= self.config.max_position:
            raise RequestError(f"position {positions.max()} is beyond the context of {self.config.max_position}")
        max_blocks = -(-max_ctx // bs)
        tables = np.zeros((n_seq, max_blocks), dtype=np.int64)
        for j, table in enumerate(batch.block_tables):
            if len(table) * bs < clens[j]:
                raise LlmcError(f"sequence {layout.seq_ids[j]} has {len(table)} blocks for {clens[j]} tokens")
            tables[j, : min(len(table), max_blocks)] = table[:max_blocks]
        pos = np.arange(max_ctx)
        ctx_slots = tables[:, pos // bs] * bs + pos % bs  # entries past a sequence's context are masked
        slot_mapping = ctx_slots[seq_of_row, positions]
        q_index = np.zeros((n_seq, max_q), dtype=np.int64)
        q_index[seq_of_row, offsets] = np.arange(len(offsets))
        out_index = seq_of_row * max_q + offsets
        rows = np.arange(max_q)
        causal = pos[None, None, :] <= (past[:, None] + rows[None, :])[:, :, None]
        mask = causal & (rows[None, :, None] < qlens[:, None, None])  # (B, max_q, max_ctx)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)
        return StepContext(t(positions), t(slot_mapping), t(ctx_slots), t(q_index), t(out_index), t(mask[:, None]), {})

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> np.ndarray:
        if self.k_cache is None:
            raise LlmcError("the kv cache is not allocated; call init_cache() first")
        if self.deterministic:
            return invariant_step(self, batch)
        name = "decode" if batch.is_decode and "decode" in self.programs else "prefill"
        ctx = self._context(batch)
        token_ids = torch.from_numpy(batch.token_ids).to(self.torch_device)
        logits_index = torch.from_numpy(batch.logits_rows).to(self.torch_device)
        return self.run_program(name, token_ids, logits_index, ctx).float().cpu().numpy()

    def run_program(self, name: str, token_ids: torch.Tensor, logits_index: torch.Tensor,
                    ctx: StepContext) -> torch.Tensor:
        """Run the lowered function ``name`` on prepared inputs; returns its logits tensor."""
        program = self.programs[name]
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


def _rope_key(attrs: dict[str, Any]) -> tuple:
    keys = ("theta", "style", "rotary_dim", "scaling", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position")
    return tuple(attrs.get(k) for k in keys)


def _embedding(table: TorchWeight, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(table, PackedWeight):
        return table.dequantize(torch.float32, rows=ids)
    return F.embedding(ids, table)


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * w.to(x.dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, rot: int) -> torch.Tensor:
    if style == "half":
        a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)
