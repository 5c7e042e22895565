"""Decode tok/s of compiled artifacts (tvm vs torch vs onnx) on the CPU, measured in one process
with the artifacts interleaved step by step.

    .venv/bin/python benchmarks/tvm_cpu.py ART [ART ...] [--steps 48] [--threads 1] [--json OUT]

Each ARTIFACT is loaded with its target's executor and prefilled with the same prompt; then
every decode step is run for each artifact in turn (order alternating), so all of them see the
same background load. Every artifact must produce the greedy ids of the first one (for
quantized variants, give ``--no-check``). Reported per artifact: decode tok/s from the median
and from the 10th-percentile step time (``p10``: the least disturbed steps) and the median
paired ratio ``step time of the first artifact / step time of this one`` (> 1: faster), which
is what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.registry import get_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="Do not require equal greedy ids.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    names, executors = [], []
    for path in args.artifacts:
        art = Artifact.load(path)
        executors.append(get_target(art.target).load(art, threads=args.threads))
        names.append(f"{path.name} ({art.target})")
    vocab = executors[0].config.vocab_size
    prompt = list(np.random.default_rng(0).integers(3, vocab, args.prompt_len))
    total = args.prompt_len + args.steps + 1
    tokens: list[int] = []
    tables: list[list[int]] = []
    for ex in executors:
        spec = ex.kv_spec()
        blocks = 1 if spec.layout == "slots" else -(-total // spec.block_size) + 1
        ex.init_cache(blocks)
        table = list(range(blocks))  # slot-based caches: one slot id
        tables.append(table)
        n = len(prompt)
        logits = ex.step(StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [table], [n - 1]))
        tokens.append(int(logits[0].argmax()))
    times: list[list[float]] = [[] for _ in executors]
    ids: list[list[int]] = [[t] for t in tokens]
    for step in range(args.steps):
        order = range(len(executors)) if step % 2 == 0 else reversed(range(len(executors)))
        ctx = args.prompt_len + step + 1
        for i in order:
            ex = executors[i]
            batch = StepBatch(np.asarray([ids[i][-1]]), BatchLayout((0,), (1,), (ctx,)), [tables[i]], [0])
            start = time.perf_counter()
            logits = ex.step(batch)
            times[i].append(time.perf_counter() - start)
            ids[i].append(int(logits[0].argmax()))
    if not args.no_check:
        for name, got in zip(names[1:], ids[1:], strict=True):
            if got != ids[0]:
                raise SystemExit(f"{name} diverged from {names[0]}: {got[:10]} vs {ids[0][:10]}")
    rows = []
    for name, t in zip(names, times, strict=True):
        ratio = statistics.median(a / b for a, b in zip(times[0], t, strict=True))
        rows.append({"artifact": name, "decode_tok_s_median": 1 / statistics.median(t),
                     "decode_tok_s_p10": 1 / float(np.percentile(t, 10)), "paired_speedup_vs_first": ratio})
    report = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
              "steps": args.steps, "prompt_len": args.prompt_len, "rows": rows}
    print(f"{'artifact':50} {'tok/s median':>12} {'tok/s p10':>10} {'vs first':>9}")
    for r in rows:
        print(f"{r['artifact']:50} {r['decode_tok_s_median']:12.2f} {r['decode_tok_s_p10']:10.2f} "
              f"{r['paired_speedup_vs_first']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
