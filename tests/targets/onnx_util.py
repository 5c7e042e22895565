"""Helpers for the ONNX target tests: a step driver for any executor, and a numpy RTN quantizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from llmc.compiler.frontends.source import ModelSource, load_source
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, pack_codes
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.registry import get_target

Step = Sequence[tuple[int, Sequence[int]]]
"""One step: (sequence id, its new tokens) for each sequence in the step."""

# A ragged schedule: first prompts of different lengths, two of equal length (one batched
# call), decode rows in non-adjacent slots (gather path) and adjacent ones (in place), and
# prefill chunks after a cached prefix, mixed with decode rows in the same step.
SCHEDULE: list[list[tuple[int, list[int]]]] = [
    [(0, [1, 5, 9, 33, 7]), (1, [1, 8, 2, 40, 41, 42, 3, 4, 5]), (2, [1, 60, 61])],
    [(0, [11]), (2, [12]), (1, [13, 14, 15, 16])],
    [(2, [17]), (1, [18]), (0, [19]), (3, [1, 3, 5, 7, 9, 11]), (4, [1, 2, 4, 8]), (5, [1, 9, 7, 5])],
    [(0, [20, 21, 22, 23, 24, 25, 26]), (3, [27]), (2, [28]), (5, [29])],
    [(0, [30]), (1, [31]), (2, [32]), (3, [33]), (4, [34]), (5, [35])],
]


FLOAT_ACTIVATIONS = {"quant_kernels": "dequant"}
"""Load options of a torch artifact whose quantized matmuls then run on float32 activations: the exact
reference for other targets' float kernels (the torch target's CPU default quantizes activations to int8)."""


def load_executor(path: Path, **options: object) -> Executor:
    """The executor of the artifact at ``path`` (its own target), with load ``options``."""
    artifact = Artifact.load(path)
    return get_target(artifact.target).load(artifact, **options)


def drive(executor: Executor, steps: Sequence[Step], last_only: bool = False) -> list[np.ndarray]:
    """Run ``steps`` on ``executor`` with fresh cache bookkeeping; returns each step's logits."""
    spec = executor.kv_spec()
    seqs = {seq for step in steps for seq, _ in step}
    longest = max(sum(len(t) for step in steps for s, t in step if s == seq) for seq in seqs)
    allocator = BlockAllocator(len(seqs) * allocator_blocks(longest, spec.block_size), spec.block_size)
    executor.init_cache(allocator.num_blocks)
    tables: dict[int, list[int]] = {}
    context: dict[int, int] = {}
    results = []
    for step in steps:
        ids, qlens, clens, step_tables = [], [], [], []
        for seq, tokens in step:
            context[seq] = context.get(seq, 0) + len(tokens)
            allocator.grow(tables.setdefault(seq, []), context[seq])
            ids.extend(tokens)
            qlens.append(len(tokens))
            clens.append(context[seq])
            step_tables.append(tables[seq])
        layout = BatchLayout(tuple(s for s, _ in step), tuple(qlens), tuple(clens))
        rows = layout.last_token_rows() if last_only else list(range(layout.num_tokens))
        results.append(executor.step(StepBatch(np.asarray(ids), layout, step_tables, np.asarray(rows))))
    return results


def allocator_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def rtn_quantize(w: np.ndarray, bits: int, group: int, symmetric: bool) -> QuantizedTensor:
    """Round-to-nearest group quantization into llmc's QuantizedTensor (float16 scales/offsets)."""
    w = np.asarray(w, dtype=np.float32)
    out, inp = w.shape
    groups = -(-inp // group)
    padded = np.zeros((out, groups * group), np.float32)
    padded[:, :inp] = w
    wg = padded.reshape(out, groups, group)
    top = 2**bits - 1
    if symmetric:
        zero = 2 ** (bits - 1)
        scale = (np.abs(wg).max(axis=2) / (zero - 1)).astype(np.float16)
        s = np.maximum(scale.astype(np.float32), 1e-8)[..., None]
        q = np.clip(np.rint(wg / s) + zero, 0, top)
        offsets = None
    else:
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        scale = ((hi - lo) / top).astype(np.float16)
        offsets = lo.astype(np.float16)
        s = np.maximum(scale.astype(np.float32), 1e-8)[..., None]
        q = np.clip(np.rint((wg - offsets.astype(np.float32)[..., None]) / s), 0, top)
    codes = q.reshape(out, groups * group)[:, :inp].astype(np.uint8)
    spec = QuantSpec(bits, group, symmetric)
    return QuantizedTensor(spec, (out, inp), pack_codes(codes, bits), scale, offsets)


def quantize_source(source: ModelSource, bits: int, group: int | None, symmetric: bool) -> None:
    """Replace every matrix of ``source`` by its RTN quantization (``group`` None: one group per row)."""
    done: dict[int, tuple[np.ndarray, QuantizedTensor]] = {}  # keeps the arrays alive: ids stay unique
    for name in list(source.weights):
        w = source.weights[name]
        if np.asarray(w).ndim != 2:
            continue
        if id(w) not in done:  # a tied head stays the same object as the embedding
            done[id(w)] = (w, rtn_quantize(w, bits, group or w.shape[1], symmetric))
        source.weights[name] = done[id(w)][1]


def compile_transformed(monkeypatch, path: Path, out: Path, target: str, transform: Callable[[ModelSource], None],
                        **options: object) -> Path:
    """Compile ``path`` after ``transform`` rewrote its loaded source (the same for every target)."""
    import llmc.driver as driver

    def load(p: object, **kwargs: object) -> ModelSource:
        source = load_source(path)
        transform(source)
        return source

    with monkeypatch.context() as m:
        m.setattr(driver, "load_source", load)
        return compile_model(path, out, CompileOptions(target=target, **options))  # type: ignore[arg-type]
