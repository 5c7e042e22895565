"""The reference interpreter: NumPy, float64 by default, the ground truth for every test.

It favours obviousness over speed: one NumPy expression per op, attention as a loop over
the sequences of the batch with an explicit causal mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from llmc.compiler.errors import IRError
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.graph import Module, Node, Value
from llmc.compiler.ir.rope import RopeSpec
from llmc.compiler.weights import Weight, as_float


class KVStore(Protocol):
    """What attention asks of the cache: append a sequence's new keys and values for a layer
    (``past`` tokens are cached before them) and return its whole context."""

    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray,
               past: int) -> tuple[np.ndarray, np.ndarray]: ...


class NumpyKVCache:
    """Per (layer, sequence) growing K and V arrays ``[tokens, kv_heads, head_dim]``."""

    def __init__(self) -> None:
        self.keys: dict[tuple[int, int], np.ndarray] = {}
        self.values: dict[tuple[int, int], np.ndarray] = {}

    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray, past: int) -> tuple[np.ndarray, np.ndarray]:
        key = (layer, seq)
        old_k = self.keys.get(key, k[:0])
        old_v = self.values.get(key, v[:0])
        if old_k.shape[0] != past:
            raise IRError(f"kv cache of sequence {seq}, layer {layer} holds {old_k.shape[0]} tokens, step says {past}")
        self.keys[key] = np.concatenate([old_k, k])
        self.values[key] = np.concatenate([old_v, v])
        return self.keys[key], self.values[key]

    def drop(self, seq: int) -> None:
        for store in (self.keys, self.values):
            for key in [k for k in store if k[1] == seq]:
                del store[key]


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


class Interpreter:
    """Runs a module's functions on NumPy arrays."""

    def __init__(self, module: Module, weights: Mapping[str, Weight], dtype: type = np.float64) -> None:
        self.module = module
        self.weights = weights
        self.dtype = np.dtype(dtype)
        self._cache: dict[str, np.ndarray] = {}

    def param(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = as_float(self.weights[name], self.dtype)
        return self._cache[name]

    def run(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray],
        layout: BatchLayout,
        kv: KVStore,
    ) -> dict[str, np.ndarray]:
        fn = self.module.functions[function]
        env: dict[int, tuple[np.ndarray, ...]] = {}

        def get(v: Value) -> np.ndarray:
            return env[id(v.node)][v.index]

        for node in fn.nodes:
            if node.op == "input":
                name = str(node.attrs["name"])
                env[id(node)] = (kv,) if name == "kv_cache" else (np.asarray(inputs[name]),)  # type: ignore[assignment]
                continue
            if node.op == "param":
                env[id(node)] = (self.param(str(node.attrs["name"])),)
                continue
            kernel = KERNELS.get(node.op)
            if kernel is None:
                raise IRError(f"the reference interpreter has no kernel for {node.op!r}")
            result = kernel(self, node, [get(v) for v in node.inputs], layout)
            env[id(node)] = result if isinstance(result, tuple) else (result,)
        return {name: get(v) for name, v in fn.outputs.items()}


Kernel = Callable[[Interpreter, Node, list, BatchLayout], "np.ndarray | tuple[np.ndarray, ...]"]


def _attention(interp: Interpreter, node: Node, args: list, layout: BatchLayout) -> np.ndarray:
    q, k, v, kv = args[0], args[1], args[2], args[-1]
    if node.op == "rope_attention":
        rope = RopeSpec.from_attrs(node.attrs)
        q, k = rope.apply(q, args[3]), rope.apply(k, args[3])
    return _attend(node, q, k, v, kv, layout)


def _packed_rope_attention(interp: Interpreter, node: Node, args: list, layout: BatchLayout) -> np.ndarray:
    qkv, positions, kv = args
    heads, kv_heads, dim = (int(node.attrs[k]) for k in ("heads", "kv_heads", "head_dim"))  # type: ignore[call-overload]
    q, k, v = np.split(qkv, [heads * dim, (heads + kv_heads) * dim], axis=-1)
    rope = RopeSpec.from_attrs(node.attrs)
    q = rope.apply(q.reshape(len(qkv), heads, dim), positions)
    k = rope.apply(k.reshape(len(qkv), kv_heads, dim), positions)
    return _attend(node, q, k, v.reshape(len(qkv), kv_heads, dim), kv, layout)


def _attend(node: Node, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv: KVStore,
            layout: BatchLayout) -> np.ndarray:
    """Causal GQA attention of each sequence over its cache (appending ``k``, ``v``)."""
    layer, scale = int(node.attrs["layer"]), float(node.attrs["scale"])  # type: ignore[call-overload,arg-type]
    hq, hkv = q.shape[1], k.shape[1]
    out = np.empty_like(q)
    for j, start in enumerate(layout.starts()):
        n, past = layout.query_lens[j], layout.past_len(j)
        keys, values = kv.append(layer, layout.seq_ids[j], k[start : start + n], v[start : start + n], past)
        keys = np.repeat(keys, hq // hkv, axis=1)  # (ctx, hq, d)
        values = np.repeat(values, hq // hkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q[start : start + n], keys) * scale
        allowed = np.arange(keys.shape[0])[None, :] <= (past + np.arange(n))[:, None]
        scores = np.where(allowed[None], scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[start : start + n] = np.einsum("hqk,khd->qhd", probs, values)
    return out


def _split(interp: Interpreter, node: Node, args: list, layout: BatchLayout) -> tuple[np.ndarray, ...]:
    bounds = np.cumsum(node.attrs["sizes"])[:-1]  # type: ignore[arg-type]
    return tuple(np.split(args[0], bounds, axis=-1))


def _add_rms_norm(interp: Interpreter, node: Node, args: list, layout: BatchLayout) -> tuple[np.ndarray, ...]:
    total = args[0] + args[1]
    return _rms_norm(total, args[2], float(node.attrs["eps"])), total  # type: ignore[arg-type]


def _swiglu(interp: Interpreter, node: Node, args: list, layout: BatchLayout) -> np.ndarray:
    half = args[0].shape[-1] // 2
    return _silu(args[0][:, :half]) * args[0][:, half:]


KERNELS: dict[str, Kernel] = {
    "embedding": lambda i, n, a, _: a[0][a[1]].astype(i.dtype),
    "rms_norm": lambda i, n, a, _: _rms_norm(a[0], a[1], float(n.attrs["eps"])),  # type: ignore[arg-type]
    "linear": lambda i, n, a, _: a[0] @ a[1].T,
    "split": _split,
    "split_heads": lambda i, n, a, _: a[0].reshape(a[0].shape[0], n.attrs["heads"], n.attrs["head_dim"]),
    "merge_heads": lambda i, n, a, _: a[0].reshape(a[0].shape[0], -1),
    "rope": lambda i, n, a, _: RopeSpec.from_attrs(n.attrs).apply(a[0], a[1]),
    "attention": _attention,
    "rope_attention": _attention,
    "silu": lambda i, n, a, _: _silu(a[0]),
    "mul": lambda i, n, a, _: a[0] * a[1],
    "add": lambda i, n, a, _: a[0] + a[1],
    "gather_rows": lambda i, n, a, _: a[0][a[1]],
    "add_rms_norm": _add_rms_norm,
    "swiglu": _swiglu,
    "packed_rope_attention": _packed_rope_attention,
}
"""One kernel per op (``input`` and ``param`` are bound by :meth:`Interpreter.run`): the
reference definition of every op, and the reference target's lowering table."""
