"""Lowering an IR function to a torch :class:`Program`: one kernel per node, from :data:`TORCH_OPS`.

Lowering runs once, at load: each node becomes an :class:`Instr` (a kernel closure plus the
slots of its operands and results), so a step only walks the instruction list. A kernel takes
its operand values and the step's :class:`~llmc.targets.torch.attention.StepContext`; what
kernels need beyond their operands (the activation dtype, the RoPE tables, the attention over
the executor's cache) comes from a :class:`KernelEnv`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmc.compiler.ir.graph import Function, Node
from llmc.compiler.ir.rope import RopeSpec
from llmc.targets.lowering import LoweringTable
from llmc.targets.torch.attention import StepContext
from llmc.targets.torch.weights import PackedWeight, TorchWeight, linear

Kernel = Callable[[list[Any], StepContext], Any]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, StepContext, float], torch.Tensor]
"""``attend(layer, q, k, v, ctx, scale)``: attention over the executor's cache for one layer."""


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


class RopeTables:
    """cos/sin tables ``[max_position, rotary_dim / 2]`` per RoPE setting, made on first use."""

    def __init__(self, max_position: int, dtype: torch.dtype, device: torch.device) -> None:
        self.max_position, self.dtype, self.device = max_position, dtype, device
        self.specs: list[RopeSpec] = []
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def key(self, spec: RopeSpec) -> int:
        """A small integer naming ``spec`` (the step context's cache key)."""
        if spec not in self.specs:
            self.specs.append(spec)
        return self.specs.index(spec)

    def table(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._tables:
            cos, sin = self.specs[key].cos_sin(np.arange(self.max_position))
            self._tables[key] = (torch.from_numpy(cos).to(self.dtype).to(self.device),
                                 torch.from_numpy(sin).to(self.dtype).to(self.device))
        return self._tables[key]

    def apply(self, x: torch.Tensor, ctx: StepContext, key: int) -> torch.Tensor:
        """Rotate ``x [tokens, heads, head_dim]`` at the step's positions."""
        spec = self.specs[key]
        rot = spec.rotary_dim
        full_half = spec.half and rot == x.shape[-1]
        if key not in ctx.rope:
            cos, sin = self.table(key)
            cos, sin = cos[ctx.positions][:, None, :], sin[ctx.positions][:, None, :]
            if full_half:  # full-width tables for the 5-kernel form below
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            ctx.rope[key] = (cos, sin)
        cos, sin = ctx.rope[key]
        if full_half:
            # x*cos + rotate_half(x)*sin: bitwise the same as apply_rope's half style, fewer kernels
            a, b = x[..., : rot // 2], x[..., rot // 2 :]
            return x * cos + torch.cat((-b, a), dim=-1) * sin
        return apply_rope(x, cos, sin, spec.half, rot)


@dataclass
class KernelEnv:
    """What kernel factories read besides the node: set up once by the executor."""

    act_dtype: torch.dtype
    rope: RopeTables
    attend: Attend


KernelFactory = Callable[[KernelEnv, Node], Kernel]


def lower_function(fn: Function, params: dict[str, TorchWeight], env: Any,
                   table: LoweringTable[Any] | None = None) -> Program:
    """``fn`` as a :class:`Program` (params bound as constants); refuses ops ``table`` refuses.

    ``table`` maps ops to factories ``(env, node) -> kernel`` (default :data:`TORCH_OPS`, whose factories
    take a :class:`KernelEnv`; the CUDA decode table, :mod:`llmc.targets.torch.cuda.lowering`, its own env)."""
    ops = TORCH_OPS if table is None else table
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
            constants.append((base, params[str(node.attrs["name"])]))
        else:
            args = [slots[id(v.node)] + v.index for v in node.inputs]
            program.append(Instr(ops.handler(node.op)(env, node), args, base, len(node.out_types)))
    outputs = {name: slots[id(v.node)] + v.index for name, v in fn.outputs.items()}
    return Program(program, inputs, constants, outputs, next_slot)


# -- kernels -------------------------------------------------------------------------------
def _embedding(env: KernelEnv, node: Node) -> Kernel:
    act = env.act_dtype
    return lambda x, c: embedding(x[0], x[1]).to(act)


def _rms_norm(env: KernelEnv, node: Node) -> Kernel:
    eps = float(node.attrs["eps"])  # type: ignore[arg-type]
    return lambda x, c: rms_norm(x[0], x[1], eps)


def _add_rms_norm(env: KernelEnv, node: Node) -> Kernel:
    eps = float(node.attrs["eps"])  # type: ignore[arg-type]

    def add_rms_norm(x: list[Any], c: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        total = x[0] + x[1]
        return rms_norm(total, x[2], eps), total

    return add_rms_norm


def _linear(env: KernelEnv, node: Node) -> Kernel:
    return lambda x, c: linear(x[0], x[1])


def _split(env: KernelEnv, node: Node) -> Kernel:
    sizes = list(node.attrs["sizes"])  # type: ignore[call-overload]
    return lambda x, c: x[0].split_with_sizes(sizes, dim=-1)  # no Python wrapper: ~2x cheaper


def _split_heads(env: KernelEnv, node: Node) -> Kernel:
    heads, hd = int(node.attrs["heads"]), int(node.attrs["head_dim"])  # type: ignore[call-overload]
    return lambda x, c: x[0].view(x[0].shape[0], heads, hd)


def _merge_heads(env: KernelEnv, node: Node) -> Kernel:
    return lambda x, c: x[0].reshape(x[0].shape[0], -1)


def _rope(env: KernelEnv, node: Node) -> Kernel:
    key, rope = env.rope.key(RopeSpec.from_attrs(node.attrs)), env.rope.apply
    return lambda x, c: rope(x[0], c, key)


def _attention(env: KernelEnv, node: Node) -> Kernel:
    layer, scale = int(node.attrs["layer"]), float(node.attrs["scale"])  # type: ignore[call-overload,arg-type]
    attend = env.attend
    if node.op == "attention":
        return lambda x, c: attend(layer, x[0], x[1], x[2], c, scale)
    key, rope = env.rope.key(RopeSpec.from_attrs(node.attrs)), env.rope.apply

    def rope_attention(x: list[Any], ctx: StepContext) -> torch.Tensor:
        return attend(layer, rope(x[0], ctx, key), rope(x[1], ctx, key), x[2], ctx, scale)

    return rope_attention


def _packed_rope_attention(env: KernelEnv, node: Node) -> Kernel:
    a = node.attrs
    layer, scale = int(a["layer"]), float(a["scale"])  # type: ignore[call-overload,arg-type]
    heads, kv_heads, hd = int(a["heads"]), int(a["kv_heads"]), int(a["head_dim"])  # type: ignore[call-overload]
    sizes = [heads * hd, kv_heads * hd, kv_heads * hd]
    key, rope, attend = env.rope.key(RopeSpec.from_attrs(a)), env.rope.apply, env.attend

    def packed_rope_attention(x: list[Any], ctx: StepContext) -> torch.Tensor:
        q, k, v = x[0].split_with_sizes(sizes, dim=-1)
        t = q.shape[0]
        q, k, v = q.view(t, heads, hd), k.view(t, kv_heads, hd), v.view(t, kv_heads, hd)
        return attend(layer, rope(q, ctx, key), rope(k, ctx, key), v, ctx, scale)

    return packed_rope_attention


def _swiglu(env: KernelEnv, node: Node) -> Kernel:
    def swiglu(x: list[Any], c: StepContext) -> torch.Tensor:
        gate, up = x[0].chunk(2, dim=-1)
        return F.silu(gate) * up

    return swiglu


TORCH_OPS: LoweringTable[KernelFactory] = LoweringTable("torch", {
    "embedding": _embedding,
    "rms_norm": _rms_norm,
    "add_rms_norm": _add_rms_norm,
    "linear": _linear,
    "split": _split,
    "split_heads": _split_heads,
    "merge_heads": _merge_heads,
    "rope": _rope,
    "attention": _attention,
    "rope_attention": _attention,
    "packed_rope_attention": _packed_rope_attention,
    "silu": lambda env, node: lambda x, c: F.silu(x[0]),
    "mul": lambda env, node: lambda x, c: x[0] * x[1],
    "add": lambda env, node: lambda x, c: x[0] + x[1],
    "swiglu": _swiglu,
    "gather_rows": lambda env, node: lambda x, c: x[0].index_select(0, x[1]),
})
"""The torch target's lowering: op -> kernel factory ``(env, node) -> kernel``."""


# -- numerics ------------------------------------------------------------------------------
def embedding(table: TorchWeight, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(table, PackedWeight):
        return table.dequantize(torch.float32, rows=ids)
    return F.embedding(ids, table)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * w.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: bool, rot: int) -> torch.Tensor:
    """Rotate the first ``rot`` dims of ``x`` (``half``: rotate-half pairs, else interleaved pairs)."""
    if half:
        a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        rotated = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)
