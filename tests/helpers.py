"""Small helpers shared by tests: drive an executor or the interpreter step by step, load a script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.interp import Interpreter, NumpyKVCache
from llmc.runtime.executor import Executor, StepBatch


def load_script(path: Path, name: str) -> ModuleType:
    """The script at ``path`` (a benchmark, not a package module) imported as module ``name``; registered
    in ``sys.modules`` first, as dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class SequenceDriver:
    """Feeds tokens of several sequences to an executor with simple per-sequence block tables."""

    def __init__(self, executor: Executor, blocks_per_seq: int = 16, max_seqs: int = 8) -> None:
        self.executor = executor
        spec = executor.kv_spec()
        self.block_size = spec.block_size
        self.blocks_per_seq = blocks_per_seq
        executor.init_cache(blocks_per_seq * max_seqs)
        self.lengths: dict[int, int] = {}

    def table(self, seq: int) -> list[int]:
        return list(range(seq * self.blocks_per_seq, (seq + 1) * self.blocks_per_seq))

    def step(self, chunks: dict[int, list[int]], all_rows: bool = True) -> list[np.ndarray]:
        """Feed ``chunks[seq]`` for each seq; returns logits per seq (all rows or the last)."""
        seqs = list(chunks)
        qlens = tuple(len(chunks[s]) for s in seqs)
        ctx = tuple(self.lengths.get(s, 0) + q for s, q in zip(seqs, qlens, strict=True))
        layout = BatchLayout(tuple(seqs), qlens, ctx)
        ids = np.concatenate([np.asarray(chunks[s], dtype=np.int64) for s in seqs])
        rows = np.arange(layout.num_tokens) if all_rows else np.asarray(layout.last_token_rows())
        logits = self.executor.step(StepBatch(ids, layout, [self.table(s) for s in seqs], rows))
        for s, c in zip(seqs, ctx, strict=True):
            self.lengths[s] = c
        out, start = [], 0
        for q in qlens:
            n = q if all_rows else 1
            out.append(logits[start : start + n])
            start += n
        return out


def interpret(module, weights, chunks_per_step: list[dict[int, list[int]]], dtype=np.float64) -> list[list[np.ndarray]]:
    """Run the reference interpreter over successive steps; returns all-row logits per seq per step."""
    interp = Interpreter(module, weights, dtype)
    kv = NumpyKVCache()
    lengths: dict[int, int] = {}
    results = []
    for chunks in chunks_per_step:
        seqs = list(chunks)
        qlens = tuple(len(chunks[s]) for s in seqs)
        ctx = tuple(lengths.get(s, 0) + q for s, q in zip(seqs, qlens, strict=True))
        layout = BatchLayout(tuple(seqs), qlens, ctx)
        ids = np.concatenate([np.asarray(chunks[s], dtype=np.int64) for s in seqs])
        out = interp.run(
            "prefill",
            {"input_ids": ids, "positions": np.asarray(layout.positions()),
             "logits_index": np.arange(layout.num_tokens)},
            layout,
            kv,
        )["logits"]
        lengths.update(dict(zip(seqs, ctx, strict=True)))
        per_seq, start = [], 0
        for q in qlens:
            per_seq.append(out[start : start + q])
            start += q
        results.append(per_seq)
    return results


# Prefill chunks and decode tokens of three sequences mixed in one flattened batch (ids valid for
# stories260k's 512-token vocabulary); step 2 is decode-only (the ``decode`` function).
RAGGED_STEPS: list[dict[int, list[int]]] = [
    {0: [1, 403, 407, 261, 378], 3: [1, 17]},
    {0: [432], 3: [90, 91, 92, 93, 94, 95, 96], 7: [1, 300, 301]},
    {7: [302], 0: [383], 3: [97]},
    {3: [98], 7: list(range(310, 330))},
]


INT8_ACTIVATION_RTOL = 0.06
"""Relative L2 error allowed between logits computed with int8-quantized activations (llmc's CPU
kernels, blocks of 32 as llama.cpp's) and float activations on the same weights. One block of
values rounds to ``d * q`` with ``d = max|x| / 127``: a uniform error of RMS ``d / sqrt(12)``, which
for Gaussian-like activations (``max|x|`` of 32 values about 2.1 standard deviations) is about
0.5% of the activations' RMS, so each matmul's output moves by about 0.5% RMS (measured: 0.53%
Gaussian, 0.68% Laplace, 1.1% with 1% outliers of 20x). The 5-7 matmuls in series of the seeded
test models (random weights amplify perturbations more than trained ones) gave 2.0-2.7% on the
logits; 6% leaves a 2x margin while any real defect (a wrong scale, code or block) is O(100%)."""


def int8_activation_error(got: np.ndarray, want: np.ndarray) -> float:
    """Relative L2 distance of two logit arrays."""
    want64 = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want64) / max(np.linalg.norm(want64), 1e-30))


def assert_int8_activation_close(got: np.ndarray, want: np.ndarray, rtol: float = INT8_ACTIVATION_RTOL) -> None:
    """``got`` (int8 activations) matches ``want`` (float activations) within :data:`INT8_ACTIVATION_RTOL`."""
    error = int8_activation_error(got, want)
    assert error <= rtol, f"relative L2 error {error:.4f} above {rtol} (int8 activations)"
