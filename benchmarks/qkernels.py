"""Milliseconds per ``x @ W.T`` for a few input rows: llmc's C++ CPU kernel vs torch's kernels.

    .venv/bin/python benchmarks/qkernels.py [--threads 1] [--iters 20] [--rows 1,4,16,32]

Shapes are SmolLM2-135M's (q/o, gate/up, down, tied head). Columns, all float32 in/out:
``fp32`` F.linear on a float32 weight; ``llmc q4_1`` (4-bit asym g32, GGUF Q4_1) and ``llmc q8_0``
(8-bit sym g32, GGUF Q8_0) and ``llmc i8ch`` (8-bit sym per channel) through llmc's kernel
(targets/torch/qkernels.py); ``dequant q4_1`` = PackedWeight dequantize + F.linear (the path
without the kernel); ``int4pack`` = ``torch._weight_int4pack_mm_for_cpu`` (same Q4_1 weight);
``int8pack`` = ``torch._weight_int8pack_mm`` (per channel). All variants run interleaved in one
process (median of ``--iters``), so a loaded machine slows them alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from llmc.compiler.ir.types import QuantSpec
from llmc.passes.quant_rtn import per_channel_group, quantize_rtn
from llmc.runtime.bench.stats import interleaved_median_ms
from llmc.targets.torch import qkernels
from llmc.targets.torch.weights import PackedWeight

SHAPES = {"q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536),
          "head 49152x576": (49152, 576)}
COLUMNS = ["fp32", "llmc q4_1", "llmc q8_0", "llmc i8ch", "dequant q4_1", "int4pack", "int8pack"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rows", default="1,4,16,32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not qkernels.available():
        raise SystemExit("llmc CPU kernels unavailable (see the warning above)")
    print(f"torch {torch.__version__}, {args.threads} thread(s), cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ms per call, median of {args.iters}")
    print("| shape | rows | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for label, (n, k) in SHAPES.items():
        for rows in (int(r) for r in args.rows.split(",")):
            iters = max(3, args.iters // 4) if n * k > 10**7 else args.iters
            med = measure(n, k, rows, iters)
            print(f"| {label} | {rows} | " + " | ".join(f"{med[c]:.3f}" for c in COLUMNS) + " |", flush=True)


def measure(n: int, k: int, rows: int, iters: int) -> dict[str, float]:
    """Median ms per call of each column for a ``[n, k]`` weight and ``rows`` input rows."""
    cpu = torch.device("cpu")
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    x = torch.randn(rows, k)
    wt = torch.from_numpy(w)
    q41 = quantize_rtn(w, QuantSpec(4, 32, False))
    kq41 = PackedWeight(q41, cpu)
    kq80 = PackedWeight(quantize_rtn(w, QuantSpec(8, 32, True)), cpu)
    i8spec = QuantSpec(8, per_channel_group(k), True)
    ki8 = PackedWeight(quantize_rtn(w, i8spec), cpu)
    deq = PackedWeight(q41, cpu)
    deq.cpu_kernel = False
    i4 = PackedWeight(q41, cpu)
    i4.prepare_linear(int4pack=True)
    i8 = PackedWeight(quantize_rtn(w, i8spec), cpu)
    i8.prepare_linear()

    def int8pack() -> torch.Tensor:  # the kernel itself, also above PackedWeight's row threshold
        assert i8._int8 is not None and i8._scale32 is not None
        return torch._weight_int8pack_mm(x, i8._int8, i8._scale32)

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: torch.nn.functional.linear(x, wt),
        "llmc q4_1": lambda: kq41._cpu_kernel_linear(x),
        "llmc q8_0": lambda: kq80._cpu_kernel_linear(x),
        "llmc i8ch": lambda: ki8._cpu_kernel_linear(x),
        "dequant q4_1": lambda: deq.linear(x),
        "int4pack": lambda: i4.linear(x),
        "int8pack": int8pack,
    }
    PackedWeight.CPU_KERNEL_MAX_ROWS = max(PackedWeight.CPU_KERNEL_MAX_ROWS, rows)  # time the kernel at any rows
    return interleaved_median_ms(fns, iters)


if __name__ == "__main__":
    main()
