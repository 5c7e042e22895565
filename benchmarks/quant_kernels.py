"""Milliseconds per ``x @ W.T`` for one decode row (M=1) with each weight format on the torch CPU target.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 1] [--iters 30]

Shapes are SmolLM2-135M's (fused qkv, gate_up, down, and the 49152-row tied head). Formats:
float32 ``F.linear``; float16 weights cast per call (what the executor does for ``--quant
fp16``); int8 per channel via ``torch._weight_int8pack_mm``; int4 g32 via
``torch._weight_int4pack_mm_for_cpu``; and llmc's fallback (``PackedWeight`` dequantize + F.linear)
for the same int4 weight. Every variant runs interleaved in one process (median of ``--iters``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from llmc.compiler.ir.types import QuantSpec
from llmc.passes.quant_rtn import per_channel_group, quantize_rtn
from llmc.runtime.bench.stats import interleaved_median_ms
from llmc.targets.torch.weights import PackedWeight

SHAPES = {"qkv 960x576": (960, 576), "gate_up 3072x576": (3072, 576), "down 576x1536": (576, 1536),
          "head 49152x576": (49152, 576)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call, median of {args.iters}")
    print("| shape | fp32 | fp16 (cast per call) | int8 `_weight_int8pack_mm` | int4 g32 `_weight_int4pack_mm_for_cpu` "
          "| int4 g32 dequant + F.linear |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, (n, k) in SHAPES.items():
        med = measure(n, k, args.iters)
        print(f"| {label} | {med['fp32']:.2f} | {med['fp16']:.2f} | {med['int8']:.2f} | {med['int4']:.2f} "
              f"| {med['int4d']:.2f} |")


def measure(n: int, k: int, iters: int) -> dict[str, float]:
    """Median ms per call of each format for a ``[n, k]`` weight and one input row."""
    cpu = torch.device("cpu")
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    x = torch.randn(1, k)
    wt, w16 = torch.from_numpy(w), torch.from_numpy(w).half()
    i8 = PackedWeight(quantize_rtn(w, QuantSpec(8, per_channel_group(k), True)), cpu)
    i8.prepare_linear()
    i4 = PackedWeight(quantize_rtn(w, QuantSpec(4, 32, False)), cpu)
    i4.prepare_linear()
    i4d = PackedWeight(quantize_rtn(w, QuantSpec(4, 32, False)), cpu)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: torch.nn.functional.linear(x, wt),
        "fp16": lambda: torch.nn.functional.linear(x, w16.float()),
        "int8": lambda: i8.linear(x),
        "int4": lambda: i4.linear(x),
        "int4d": lambda: torch.nn.functional.linear(x, i4d.dequantize(torch.float32)),
    }
    return interleaved_median_ms(fns, iters)


if __name__ == "__main__":
    main()
