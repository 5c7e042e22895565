#!/usr/bin/env python
"""One decode step of an artifact at a batch size, bracketed by cudaProfilerStart/Stop so that
Nsight Compute sees only its kernels; prints the step's wall time (median of 20) first.

    ncu --profile-from-start off --print-summary per-kernel \\
        python benchmarks/gpu/profile_step.py ARTIFACT --batch 8 [--context 128]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.registry import get_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args(argv)
    art = Artifact.load(args.artifact)
    ex = get_target(art.target).load(art)
    spec = ex.kv_spec()
    per_seq = -(-(args.context + 64) // spec.block_size)
    b = args.batch
    ex.init_cache(b if spec.layout == "slots" else b * per_seq)
    tables = [[j] if spec.layout == "slots" else list(range(j * per_seq, (j + 1) * per_seq)) for j in range(b)]
    rng = np.random.default_rng(0)
    seqs = tuple(range(b))
    layout = BatchLayout(seqs, (args.context,) * b, (args.context,) * b)
    ex.step(StepBatch(rng.integers(0, art.config.vocab_size, b * args.context), layout, tables,
                      layout.last_token_rows()))
    ctx, times = args.context, []
    for _ in range(21):
        ctx += 1
        step = StepBatch(rng.integers(0, art.config.vocab_size, b), BatchLayout(seqs, (1,) * b, (ctx,) * b),
                         tables, np.arange(b))
        t0 = time.perf_counter()
        ex.step(step)
        times.append(time.perf_counter() - t0)
    print(f"decode step, batch {b}, context {ctx}: median {np.median(times[1:]) * 1e3:.2f} ms", flush=True)
    cudart = ctypes.CDLL("libcudart.so.13")
    ctx += 1
    step = StepBatch(rng.integers(0, art.config.vocab_size, b), BatchLayout(seqs, (1,) * b, (ctx,) * b),
                     tables, np.arange(b))
    cudart.cudaProfilerStart()
    ex.step(step)
    cudart.cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
