"""Activation-aware weight scaling (AWQ-style) before low-bit quantization.

For every group of linears that read the same activation ``X`` (q/k/v or a fused qkv after
``attn_norm``; gate/up after ``mlp_norm``; ``down`` after ``silu(gate) * up``), a per-input-
channel scale ``s = mean|X|**alpha`` (normalised) is searched over a grid of ``alpha`` to
minimise ``sum_i ||X W_i^T - (X / s) Q(W_i * s)^T||^2`` on calibration activations. The
chosen scale is then applied exactly: the linears' columns are multiplied by ``s`` and the
producer of ``X`` is divided by ``s`` (the rms_norm weight, or the rows of ``up`` / the up
half of a fused gate_up), so the float model computes the same function. One scale is shared
by all linears of a group because they share the one producer. ``alpha = 0`` is plain RTN,
so the result is never worse than RTN on the calibration data.

Activations come from the reference interpreter (float32) running ``prefill`` on the
calibration tokens, with every linear input added as an extra function output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.interp import Interpreter, NumpyKVCache
from llmc.compiler.weights import WeightStore, as_float

log = logging.getLogger(__name__)

FakeQuant = Callable[[str, np.ndarray], np.ndarray]
"""(param name, float weight) -> the weight after quantize + dequantize under its scheme."""


@dataclass
class ScaleGroup:
    """Linears sharing one input, and where the inverse scale folds."""

    linears: list[str]
    fold_param: str
    fold_rows: tuple[int, int] | None  # None: a norm vector; else rows [a, b) of a matrix
    act_key: str


def _param_name(value: Value) -> str | None:
    return str(value.node.attrs["name"]) if value.node.op == "param" else None


def find_groups(fn: Function) -> list[ScaleGroup]:
    """Linear groups of ``fn`` whose input producer can absorb an inverse per-channel scale."""
    users = fn.users()
    by_input: dict[Value, list[Node]] = {}
    for node in fn.nodes:
        if node.op == "linear" and _param_name(node.inputs[1]) is not None:
            by_input.setdefault(node.inputs[0], []).append(node)
    param_uses: dict[str, int] = {}
    for node in fn.nodes:
        for v in node.inputs:
            name = _param_name(v)
            if name is not None:
                param_uses[name] = param_uses.get(name, 0) + 1
    groups: list[ScaleGroup] = []
    for value, linears in by_input.items():
        consumers = users[value.node]
        if any(c.op != "linear" for c in consumers if value in c.inputs):
            continue  # the activation is also read by something we cannot rescale
        names = [str(_param_name(n.inputs[1])) for n in linears]
        producer = value.node
        fold = _fold_target(producer, value.index, users, param_uses)
        if fold is None:
            continue
        groups.append(ScaleGroup(names, fold[0], fold[1], f"act:{names[0]}"))
    return groups


def _fold_target(producer: Node, index: int, users: dict[Node, list[Node]],
                 param_uses: dict[str, int]) -> tuple[str, tuple[int, int] | None] | None:
    if producer.op in ("rms_norm", "add_rms_norm") and index == 0:
        w = _param_name(producer.inputs[1 if producer.op == "rms_norm" else 2])
        if w is not None and param_uses.get(w) == 1:
            return w, None
        return None
    if producer.op == "mul":  # silu(gate) * up: fold into up's rows
        up = producer.inputs[1].node
        if up.op == "linear" and len(users[up]) == 1:
            name = _param_name(up.inputs[1])
            if name is not None and param_uses.get(name) == 1:
                rows = up.out_types[0].shape[1]
                return (name, (0, int(rows))) if isinstance(rows, int) else None
        return None
    if producer.op == "swiglu":  # fused gate_up: the up half is the second half of the rows
        gu = producer.inputs[0].node
        if gu.op == "linear" and len(users[gu]) == 1:
            name = _param_name(gu.inputs[1])
            rows = gu.out_types[0].shape[1]
            if name is not None and param_uses.get(name) == 1 and isinstance(rows, int):
                return name, (rows // 2, rows)
    return None


def collect_activations(module: Module, weights: WeightStore, ids: list[int],
                        keys: dict[str, Value]) -> dict[str, np.ndarray]:
    """Run ``prefill`` on ``ids`` in the reference interpreter; return the values in ``keys``."""
    fn = module.functions["prefill"]
    probe = Function(fn.name, fn.nodes, {**fn.outputs, **keys})
    probe_module = Module({"prefill": probe}, module.params, module.config, module.meta)
    n = len(ids)
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64), "positions": np.arange(n, dtype=np.int64),
             "logits_index": np.asarray([n - 1], dtype=np.int64)}
    out = Interpreter(probe_module, weights, dtype=np.float32).run(
        "prefill", feeds, BatchLayout((0,), (n,), (n,)), NumpyKVCache())
    return {k: np.asarray(out[k], dtype=np.float32) for k in keys}


def search_scale(x: np.ndarray, ws: list[np.ndarray], names: list[str], fake_quant: FakeQuant,
                 grid: int, search_tokens: int = 256) -> tuple[np.ndarray, float, float, float]:
    """Best per-channel scale for weights ``ws`` reading ``x``; returns (s, alpha, err, rtn_err)."""
    mag = np.abs(x).mean(axis=0).astype(np.float64)
    mag = np.maximum(mag, 1e-8)
    if x.shape[0] > search_tokens:  # the error is measured on an evenly spaced subset of rows
        x = x[np.linspace(0, x.shape[0] - 1, search_tokens).astype(np.int64)]
    ref = [x @ w.T for w in ws]
    best: tuple[float, float, np.ndarray] | None = None
    rtn_err = 0.0
    for step in range(grid + 1):
        alpha = step / grid
        s = mag**alpha
        s = s / np.sqrt(s.max() * s.min())
        s32 = s.astype(np.float32)
        err = 0.0
        for name, w, r in zip(names, ws, ref, strict=True):
            wq = fake_quant(name, w * s32[None, :]) / s32[None, :]
            err += float(np.sum((r - x @ wq.T) ** 2))
        if step == 0:
            rtn_err = err
        if best is None or err < best[0]:
            best = (err, alpha, s32)
    assert best is not None
    return best[2], best[1], best[0], rtn_err


def apply_awq(module: Module, weights: WeightStore, ids: list[int], fake_quant: FakeQuant,
              wants: Callable[[str], bool], grid: int = 10) -> dict[str, int]:
    """Search and fold AWQ scales for every foldable group with a linear ``wants`` selects."""
    if "prefill" not in module.functions:
        raise LlmcError("AWQ calibration needs the module's prefill function")
    if len(ids) < 2:
        raise LlmcError("the calibration text is too short (need at least 2 tokens)")
    groups = [g for g in find_groups(module.functions["prefill"]) if any(wants(n) for n in g.linears)]
    fn = module.functions["prefill"]
    act_values: dict[str, Value] = {}
    for node in fn.nodes:
        if node.op == "linear" and _param_name(node.inputs[1]) is not None:
            act_values[f"act:{_param_name(node.inputs[1])}"] = node.inputs[0]
    keys = {g.act_key: act_values[g.act_key] for g in groups}
    window = int(module.config.get("max_position") or len(ids))  # texts longer than the context: in windows
    parts = [collect_activations(module, weights, ids[i : i + window], keys)
             for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]
    acts = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    improved = 0
    total_err = total_rtn = 0.0
    for g in groups:
        x = acts[g.act_key]
        ws = [as_float(weights[n], np.float32) for n in g.linears]
        s, alpha, err, rtn = search_scale(x, ws, g.linears, fake_quant, grid)
        total_err += err
        total_rtn += rtn
        if alpha == 0.0:
            continue
        improved += 1
        for n, w in zip(g.linears, ws, strict=True):
            weights[n] = w * s[None, :]
        target = as_float(weights[g.fold_param], np.float32).copy()
        if g.fold_rows is None:
            target = target / s
        else:
            a, b = g.fold_rows
            target[a:b] = target[a:b] / s[:, None]
        weights[g.fold_param] = target
        log.debug("awq %s: alpha %.2f, err %.4g (rtn %.4g)", g.linears, alpha, err, rtn)
    ratio = round(1000 * total_err / total_rtn) if total_rtn else 1000
    return {"awq_groups": len(groups), "awq_scaled": improved, "awq_err_permille_of_rtn": ratio}
