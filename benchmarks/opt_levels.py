"""Decode tok/s of one model on the torch target at several pass pipelines (O0 vs O2 and
ablations), measured in one process with the variants interleaved round by round.

    .venv/bin/python benchmarks/opt_levels.py MODEL [--variants O0,O2] [--steps 64] [--rounds 3]

MODEL is anything ``llmc compile`` reads (a .gguf file or a Hugging Face folder). A variant
is ``O<n>`` or a custom pass list in brackets, e.g. ``"[share-tied-weights,fuse-qkv,dce]"``.
Every variant is compiled in memory (front end -> passes), loaded into the torch executor,
checked to give the same greedy tokens as the first variant, and timed: a prefill of
``--prompt`` tokens, then ``--steps`` single-token decode steps. Figures are decode steps per
second: wall clock (median and best round) and per second of this process's CPU time (with
one torch thread, the CPU-time figure is the one that survives a machine shared with other
jobs: it does not count time spent waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llmc.compiler.driver import CompileOptions, frontend_module, optimize
from llmc.compiler.frontends.source import load_source
from llmc.compiler.ir.batch import BatchLayout
from llmc.targets.base import StepBatch
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.target import TorchTarget


def compile_variant(model: str, variant: str) -> tuple[TorchExecutor, dict[str, dict[str, int]]]:
    source = load_source(model)
    module = frontend_module(source, None)
    target = TorchTarget()
    if variant.startswith("["):
        options = CompileOptions(passes=variant.strip("[]"))
    else:
        options = CompileOptions(opt_level=int(variant.lstrip("O")))
    module, _ = optimize(module, source.weights, options, target.fused_ops, target.name,
                         target.preferred_passes(options.opt_level) if not options.passes else None)
    return TorchExecutor(module, source.weights), module.op_counts()


def greedy_decode(executor: TorchExecutor, prompt: list[int], steps: int) -> tuple[list[int], float, float]:
    """Greedy ids after ``prompt``, the decode wall seconds and CPU seconds (prefill excluded)."""
    block = executor.kv_spec().block_size
    total = len(prompt) + steps + 1
    executor.init_cache(-(-total // block))
    table = list(range(-(-total // block)))
    n = len(prompt)
    logits = executor.step(StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [table], [n - 1]))
    ids = [int(np.argmax(logits[0]))]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        ctx = n + i + 1
        logits = executor.step(StepBatch(np.asarray(ids[-1:]), BatchLayout((0,), (1,), (ctx,)), [table], [0]))
        ids.append(int(np.argmax(logits[0])))
    return ids, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default="O0,O2")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length (ids 1..)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable figures on a shared machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in (s.strip() for s in args.variants.split(";" if "[" in args.variants else ","))
                if v]
    prompt = [1 + (i * 7919) % 97 for i in range(args.prompt)]

    executors, counts = {}, {}
    for v in variants:
        executors[v], counts[v] = compile_variant(args.model, v)
    reference: list[int] | None = None
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu_times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            ids, seconds, cpu = greedy_decode(executors[v], prompt, args.steps)
            if reference is None:
                reference = ids
            elif ids != reference:
                raise SystemExit(f"variant {v} gives different greedy ids than {variants[0]}")
            times[v].append(args.steps / seconds)
            cpu_times[v].append(args.steps / cpu)

    results = {
        "model": args.model,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "prompt": args.prompt,
        "rounds": args.rounds,
        "variants": {
            v: {
                "decode_tok_s_median": round(statistics.median(times[v]), 2),
                "decode_tok_s_best": round(max(times[v]), 2),
                "decode_tok_s_all": [round(t, 2) for t in times[v]],
                "cpu_tok_s_median": round(statistics.median(cpu_times[v]), 2),
                "linear_ops_decode": counts[v]["decode"].get("linear", 0),
                "nodes_decode": sum(counts[v]["decode"].values()),
            }
            for v in variants
        },
    }
    base = results["variants"][variants[0]]
    print(f"{'variant':<34} {'median':>8} {'best':>8} {'cpu-time':>9} {'cpu vs ' + variants[0]:>10} "
          f"{'nodes':>6} {'linear':>6}   (decode tok/s)")
    for v, r in results["variants"].items():
        label = v if len(v) <= 34 else v[:31] + "..."
        print(f"{label:<34} {r['decode_tok_s_median']:>8.2f} {r['decode_tok_s_best']:>8.2f} "
              f"{r['cpu_tok_s_median']:>9.2f} {r['cpu_tok_s_median'] / base['cpu_tok_s_median']:>9.3f}x "
              f"{r['nodes_decode']:>6} {r['linear_ops_decode']:>6}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
