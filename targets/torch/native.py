"""An IR function as llmc's native step program: one C++ call per step, no per-op framework work.

:func:`lower_native` walks a function once and emits, for each op, one instruction of
``NativeProgram`` (``csrc/qk_program.cpp``): row buffers of float32 activations (reused once a
value is dead; ``split`` / ``split_heads`` / ``merge_heads`` are views, not copies), linears on
llmc's int8-activation kernels (activations quantized once per buffer and step, shared by the
linears that read them), RMSNorm, RoPE, SwiGLU and causal attention over the executor's paged KV
cache. A step then runs every instruction on one persistent thread pool, with the GIL released
(``csrc/qk_pool.h``): each instruction's work is cut into pieces that any thread may finish, so a
thread the OS preempts (a co-located server loop or load client) does not hold the others at the op's
end; workers spin between the ops of a step and sleep between steps.

It applies to CPU modules whose matmul weights are all quantized (GGUF blocks or llmc's int4/int8
groups the kernels take) with float32 activations; :func:`lower_native` returns a reason instead
otherwise and the executor keeps running torch ops.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import RequestError
from llmc.compiler.ir.graph import Function, Node, Value
from llmc.compiler.ir.rope import RopeSpec
from llmc.runtime.executor import StepBatch
from llmc.targets.torch import qkernels
from llmc.targets.torch.weights import PackedWeight, TorchWeight

View = tuple[int, int, int]  # (buffer, first column, width)
ELEMENTWISE = {"silu": 0, "mul": 2, "add": 3}
KEEP_LOGITS_BYTES = 64 << 20
"""The largest logits buffer a :class:`NativeStep` keeps for the next step (32 rows of a 49152 vocabulary: 6 MiB)."""


class Unsupported(Exception):
    """This function cannot run as a native program (the message says why)."""


@dataclass
class _Val:
    view: View | None = None
    output_rows: bool = False
    heads: int = 0
    head_dim: int = 0
    input: str | None = None
    param: str | None = None


class NativeStep:
    """A lowered function; :meth:`run` computes one step's logits."""

    def __init__(self, program: Any, config: ModelConfig, instructions: int) -> None:
        self.program = program
        self.config = config
        self.instructions = instructions
        self._logits: torch.Tensor | None = None  # the last step's logits, reused while nobody holds them
        self._array: np.ndarray | None = None  # ... as the array run() returned

    def _reusable_logits(self, rows: int) -> torch.Tensor | None:
        """The previous step's logits buffer when it has ``rows`` rows and no caller holds its array
        (or a view of it) any more, else None (the program then allocates a fresh one). A 32 x 49152
        float32 buffer is 6 MiB: freshly mapped pages faulted in and unmapped again cost ~1 ms a step."""
        if self._array is None or self._array.shape[0] != rows or sys.getrefcount(self._array) > 2:
            return None  # 2: this attribute and getrefcount's argument
        return self._logits

    def run(self, batch: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
            threads: int, block_major: bool = False) -> np.ndarray:
        """Logits ``[outputs, vocab]`` of one step. The caches are float32 or float16 (the step's
        keys and values are then rounded to float16 as they are stored). With ``block_major`` each
        block's byte range holds its keys transposed (``[kv_heads, head_dim, block_size]``) and then,
        in ``v_cache``, its values as ``[kv_heads, block_size, head_dim]``, which decode attention
        reads as contiguous runs; only native steps may then read the cache, and ``block_size`` must
        be a multiple of 16."""
        layout = batch.layout
        ctx = np.asarray(layout.context_lens, dtype=np.int64)
        if ctx.size and int(ctx.max()) > self.config.max_position:
            raise RequestError(f"position {int(ctx.max()) - 1} is beyond the context of {self.config.max_position}")
        tables = batch.block_tables
        width = max((len(t) for t in tables), default=0)
        table = np.zeros((len(tables), max(width, 1)), dtype=np.int64)
        for j, t in enumerate(tables):
            table[j, : len(t)] = t
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        out = self._reusable_logits(len(batch.logits_rows))
        logits = self.program.run(as_t(batch.token_ids), as_t(layout.query_lens), as_t(ctx), torch.from_numpy(table),
                                  as_t(batch.logits_rows), k_cache, v_cache, int(block_size), int(threads),
                                  bool(block_major), out=out)
        if out is not None:
            return self._array  # type: ignore[return-value]
        array = logits.numpy()
        keep = logits.numel() * 4 <= KEEP_LOGITS_BYTES  # an idle engine must not hold a long prefill's logits
        self._logits, self._array = (logits, array) if keep else (None, None)
        return array


def lower_native(fn: Function, params: dict[str, TorchWeight], config: ModelConfig) -> NativeStep:
    """``fn`` as a :class:`NativeStep`; raises :class:`Unsupported` naming the op or weight it cannot take."""
    module = qkernels.load()
    if module is None:
        raise Unsupported("llmc's CPU kernels are unavailable")
    prog = module.NativeProgram(config.num_layers, config.num_kv_heads, config.head_dim)
    return _Lowering(fn, params, config, prog).run()


def linears_together(nodes: list[Node]) -> list[Node]:
    """``nodes`` with each linear moved up to just after the previous linear of the same input (its
    weight's ``param`` node with it), so that the program runs them as one group: one quantization of
    the input and one parallel region for all their tiles (gate and up, q, k and v of mixed formats).
    Only the order changes: a linear reads its input and its weight, nothing that runs in between."""
    order: list[Node] = []
    last_linear: dict[Value, Node] = {}  # input -> the last linear reading it so far
    for node in nodes:
        prev = last_linear.get(node.inputs[0]) if node.op == "linear" else None
        if prev is not None:
            at = order.index(prev) + 1
            weight = node.inputs[1].node
            later = weight in order[at:]
            if not later or weight.op == "param":  # a param has no inputs: it can move up too
                if later:
                    order.remove(weight)
                order[at:at] = [weight, node] if later else [node]
                last_linear[node.inputs[0]] = node
                continue
        if node.op == "linear":
            last_linear[node.inputs[0]] = node
        order.append(node)
    return order


class _Lowering:
    def __init__(self, fn: Function, params: dict[str, TorchWeight], config: ModelConfig, prog: Any) -> None:
        self.fn, self.params, self.config, self.prog = fn, params, config, prog
        self.nodes = linears_together(list(fn.nodes))
        self.values: dict[Value, _Val] = {}
        self.free: dict[tuple[int, bool], list[int]] = defaultdict(list)
        self.width: dict[int, tuple[int, bool]] = {}
        self.refs: dict[int, int] = defaultdict(int)
        self.ropes: dict[RopeSpec, int] = {}
        self.count = 0
        self.last_use: dict[Value, int] = {}
        self.uses: dict[Value, int] = defaultdict(int)
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                self.last_use[v] = i
                self.uses[v] += 1
        for v in fn.outputs.values():
            self.last_use[v] = len(self.nodes)

    # -- buffers ---------------------------------------------------------------------------
    def new_view(self, width: int, output_rows: bool) -> View:
        key = (width, output_rows)
        buf = self.free[key].pop() if self.free[key] else int(self.prog.buffer(width, output_rows))
        self.width[buf] = key
        return (buf, 0, width)

    def bind(self, value: Value, val: _Val) -> None:
        self.values[value] = val
        if val.view is not None:
            self.refs[val.view[0]] += 1

    def release(self, index: int, node: Node) -> None:
        for v in set(node.inputs) | set(node.outputs):
            if self.last_use.get(v, -1) <= index and v in self.values:
                val = self.values.pop(v)
                if val.view is not None:
                    buf = val.view[0]
                    self.refs[buf] -= 1
                    if self.refs[buf] == 0:
                        self.free[self.width[buf]].append(buf)

    def view_of(self, value: Value) -> _Val:
        val = self.values.get(value)
        if val is None or val.view is None:
            raise Unsupported(f"operand {value.node.op} is not an activation the native program holds")
        return val

    def kernel(self, name: str, what: str) -> Any:
        weight = self.params[name]
        if isinstance(weight, PackedWeight):
            if not weight.prepare_cpu_kernel():
                raise Unsupported(f"{what} {name!r} ({weight.spec.describe()}) does not run on llmc's CPU kernels")
            return weight.kernel
        raise Unsupported(f"{what} {name!r} is a {weight.dtype} matrix, not a quantized one")

    def rope(self, attrs: dict[str, Any]) -> tuple[int, int, bool]:
        """The program's table for this node's RoPE setting (made once per setting), its rotary dim and style."""
        spec = RopeSpec.from_attrs(attrs)
        if spec not in self.ropes:
            cos, sin = spec.cos_sin(np.arange(self.config.max_position))
            self.ropes[spec] = int(self.prog.rope_table(torch.from_numpy(np.ascontiguousarray(cos, np.float32)),
                                                        torch.from_numpy(np.ascontiguousarray(sin, np.float32))))
        return self.ropes[spec], spec.rotary_dim, spec.half

    # -- ops -------------------------------------------------------------------------------
    def run(self) -> NativeStep:
        for index, node in enumerate(self.nodes):
            self.lower(node)
            self.count += node.op not in ("input", "param", "split", "split_heads", "merge_heads")
            self.release(index, node)
        logits = self.fn.outputs.get("logits")
        if logits is None:
            raise Unsupported(f"function {self.fn.name!r} returns no logits")
        self.prog.set_logits(self.view_of(logits).view)
        return NativeStep(self.prog, self.config, self.count)

    def lower(self, node: Node) -> None:
        op, a = node.op, node.attrs
        ins = node.inputs
        if op == "input":
            self.bind(node.out(), _Val(input=str(a["name"])))
        elif op == "param":
            self.bind(node.out(), _Val(param=str(a["name"])))
        elif op == "embedding":
            table, ids = self.values[ins[0]], self.values[ins[1]]
            if table.param is None or ids.input != "input_ids":
                raise Unsupported("embedding of something other than a table param and the input ids")
            weight = self.params[table.param]
            width = int(node.out_types[0].shape[1])  # type: ignore[arg-type]
            dst = self.new_view(width, False)
            if isinstance(weight, PackedWeight):
                self.prog.embed(dst, self.kernel(table.param, "embedding"))
            else:
                self.prog.embed(dst, weight.to(torch.float32))
            self.bind(node.out(), _Val(dst))
        elif op in ("rms_norm", "add_rms_norm"):
            x = self.view_of(ins[0])
            w = self.values[ins[-1]]
            if w.param is None or (x.output_rows and op == "add_rms_norm" and not self.view_of(ins[1]).output_rows):
                raise Unsupported(f"{op} operands")
            weight = self.params[w.param]
            if isinstance(weight, PackedWeight):
                raise Unsupported(f"quantized norm weight {w.param!r}")
            dst = self.new_view(x.view[2], x.output_rows)
            if op == "rms_norm":
                self.prog.rms_norm(dst, None, x.view, None, weight, float(a["eps"]))
                self.bind(node.out(), _Val(dst, x.output_rows))
            else:
                r = self.view_of(ins[1])
                total = self.new_view(x.view[2], x.output_rows)
                self.prog.rms_norm(dst, total, x.view, r.view, weight, float(a["eps"]))
                self.bind(node.out(0), _Val(dst, x.output_rows))
                self.bind(node.out(1), _Val(total, x.output_rows))
        elif op == "linear":
            x, w = self.view_of(ins[0]), self.values[ins[1]]
            if w.param is None:
                raise Unsupported("linear weight is not a param")
            kernel = self.kernel(w.param, "weight")
            dst = self.new_view(int(kernel.out_features), x.output_rows)
            self.prog.linear(dst, x.view, kernel)
            self.bind(node.out(), _Val(dst, x.output_rows))
        elif op == "split":
            x = self.view_of(ins[0])
            col = x.view[1]
            for i, size in enumerate(a["sizes"]):  # type: ignore[union-attr]
                self.bind(node.out(i), _Val((x.view[0], col, int(size)), x.output_rows))
                col += int(size)
        elif op == "split_heads":
            x = self.view_of(ins[0])
            self.bind(node.out(), _Val(x.view, x.output_rows, int(a["heads"]), int(a["head_dim"])))  # type: ignore
        elif op == "merge_heads":
            x = self.view_of(ins[0])
            self.bind(node.out(), _Val(x.view, x.output_rows))
        elif op == "rope":
            x = self.view_of(ins[0])
            if not x.heads or x.output_rows:
                raise Unsupported("rope of something other than split heads of the step's tokens")
            table, rot, half = self.rope(a)
            dst = self.new_view(x.view[2], False)
            self.prog.rope(dst, x.view, x.heads, x.head_dim, rot, half, table)
            self.bind(node.out(), _Val(dst, False, x.heads, x.head_dim))
        elif op in ("attention", "rope_attention"):
            q, k, v = (self.view_of(i) for i in ins[:3])
            if not (q.heads and k.heads and v.heads) or q.output_rows or k.output_rows or v.output_rows:
                raise Unsupported("attention operands must be split heads of the step's tokens")
            table, rot, half = -1, 0, True
            if op == "rope_attention":
                table, rot, half = self.rope(a)
                if not (self.read_once(ins[0]) and self.read_once(ins[1])):
                    raise Unsupported("rope_attention rotates q and k in place; here they are read elsewhere too")
            dst = self.new_view(q.heads * q.head_dim, False)
            self.prog.attention(dst, q.view, k.view, v.view, int(a["layer"]), q.heads, k.heads, q.head_dim,
                                float(a["scale"]), table, rot, half)
            self.bind(node.out(), _Val(dst, False, q.heads, q.head_dim))
        elif op == "packed_rope_attention":
            x = self.view_of(ins[0])
            heads, kv_heads, hd = (int(a[k]) for k in ("heads", "kv_heads", "head_dim"))  # type: ignore[call-overload]
            if x.output_rows or not self.read_once(ins[0]):
                raise Unsupported("packed_rope_attention rotates its packed q and k in place; here they are read "
                                  "elsewhere too")
            buf, col, _ = x.view  # type: ignore[misc]
            q_view = (buf, col, heads * hd)
            k_view = (buf, col + heads * hd, kv_heads * hd)
            v_view = (buf, col + (heads + kv_heads) * hd, kv_heads * hd)
            table, rot, half = self.rope(a)
            dst = self.new_view(heads * hd, False)
            self.prog.attention(dst, q_view, k_view, v_view, int(a["layer"]), heads, kv_heads, hd,  # type: ignore
                                float(a["scale"]), table, rot, half)  # type: ignore[arg-type]
            self.bind(node.out(), _Val(dst, False, heads, hd))
        elif op in ELEMENTWISE:
            x = self.view_of(ins[0])
            other = self.view_of(ins[1]) if len(ins) > 1 else None
            if other is not None and other.output_rows != x.output_rows:
                raise Unsupported(f"{op} mixes token rows and output rows")
            dst = self.new_view(x.view[2], x.output_rows)
            self.prog.elementwise(dst, x.view, None if other is None else other.view, ELEMENTWISE[op])
            self.bind(node.out(), _Val(dst, x.output_rows))
        elif op == "swiglu":
            x = self.view_of(ins[0])
            dst = self.new_view(x.view[2] // 2, x.output_rows)
            self.prog.swiglu(dst, x.view)
            self.bind(node.out(), _Val(dst, x.output_rows))
        elif op == "gather_rows":
            x, idx = self.view_of(ins[0]), self.values[ins[1]]
            if idx.input != "logits_index" or x.output_rows:
                raise Unsupported("gather_rows of something other than the step's rows by logits_index")
            dst = self.new_view(x.view[2], True)
            self.prog.gather_rows(dst, x.view)
            self.bind(node.out(), _Val(dst, True))
        else:
            raise Unsupported(f"op {op!r} has no native instruction")

    def read_once(self, value: Value) -> bool:
        """Whether ``value`` and the values it is a view of (through heads/merge views) have one reader each."""
        while True:
            if self.uses[value] > 1:
                return False
            if value.node.op not in ("split_heads", "merge_heads"):
                return True
            value = value.node.inputs[0]
