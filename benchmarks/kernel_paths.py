"""Milliseconds per linear on each of llmc's CPU kernel paths, over a GGUF's real tensors.

    .venv/bin/python benchmarks/kernel_paths.py MODEL.gguf [--rows 16,32,128] [--iters 7] [--threads 1]
        [--paths amx,avx512] [--json OUT]

For each block type in the GGUF and each shape of that type, every 2-D tensor of that shape (all the
model's layers: a pass reads each from memory, not from a warm cache, as a decode step does) is
multiplied by ``rows`` random float32 rows through ``KernelWeight.linear`` on each path in ``--paths``
(default: every path this CPU runs, ``qkernels.isa_paths()``). One sample is the mean time per tensor
of one pass over them; paths alternate pass by pass (``interleaved_median_ms``), so machine drift falls
on all alike. Prints a table of median ms per tensor and each path's speed against the last path
listed; ``--json`` writes the same figures. A diagnosis of the kernels alone: `llmc bench` and
``llamacpp_compare.py`` measure the model.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
from pathlib import Path

import gguf
import numpy as np
import torch

from llmc.compiler.weights import QuantizedTensor
from llmc.runtime.bench.stats import interleaved_median_ms
from llmc.targets.torch import qkernels
from llmc.targets.torch.weights import PackedWeight


def kernel_weights(path: Path) -> dict[tuple[str, int, int], list[PackedWeight]]:
    """The GGUF's quantized 2-D tensors in the kernel layout, grouped by (block type, out, in)."""
    groups: dict[tuple[str, int, int], list[PackedWeight]] = collections.defaultdict(list)
    for t in gguf.GGUFReader(path).tensors:
        name = t.tensor_type.name
        if len(t.shape) != 2 or name in ("F32", "F16", "BF16"):
            continue
        inp, out = (int(n) for n in t.shape)
        pw = PackedWeight(QuantizedTensor.from_ggml(name, (out, inp), np.asarray(t.data)), torch.device("cpu"))
        if pw.prepare_cpu_kernel() and pw.kernel is not None:
            groups[(name, out, inp)].append(pw)
    return dict(groups)


def measure(weights: list[PackedWeight], rows: int, paths: list[str], iters: int) -> dict[str, float]:
    """Median ms per tensor of each path over passes across ``weights``."""
    x = torch.randn(rows, weights[0].shape[1])

    def one_pass(isa: str) -> torch.Tensor:
        y = torch.empty(0)
        for pw in weights:
            assert pw.kernel is not None
            y = pw.kernel.linear(x, isa)
        return y

    ms = interleaved_median_ms({isa: (lambda isa=isa: one_pass(isa)) for isa in paths}, iters)
    return {isa: v / len(weights) for isa, v in ms.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--rows", default="16,32,128")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paths", default="", help="comma-separated kernel paths (default: all this CPU runs)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not qkernels.available():
        raise SystemExit("llmc CPU kernels unavailable (see the warning above)")
    torch.set_num_threads(args.threads)
    paths = args.paths.split(",") if args.paths else qkernels.isa_paths()
    missing = [p for p in paths if p not in qkernels.isa_paths()]
    if missing:
        raise SystemExit(f"kernel paths {missing} are not available on this CPU (it has {qkernels.isa_paths()})")
    base = paths[-1]
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s); ms per tensor, median of "
          f"{args.iters} passes; speed against {base}")
    print("| type | out x in | tensors | rows | " + " | ".join(paths) + " | " +
          " | ".join(f"{p} / {base}" for p in paths[:-1]) + " |")
    print("|---|---|---:|---:|" + "---:|" * (2 * len(paths) - 1))
    results = []
    for (name, out, inp), weights in sorted(kernel_weights(args.gguf).items()):
        for rows in (int(r) for r in args.rows.split(",")):
            ms = measure(weights, rows, paths, args.iters)
            results.append({"type": name, "out": out, "in": inp, "tensors": len(weights), "rows": rows, "ms": ms})
            print(f"| {name} | {out} x {inp} | {len(weights)} | {rows} | " +
                  " | ".join(f"{ms[p]:.3f}" for p in paths) + " | " +
                  " | ".join(f"{ms[base] / ms[p]:.2f}x" for p in paths[:-1]) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"gguf": str(args.gguf), "threads": args.threads, "iters": args.iters,
                                         "paths": paths, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
