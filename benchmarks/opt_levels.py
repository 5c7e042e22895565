"""Decode tok/s of one model on the torch CPU target at several pass pipelines (O0 vs O2,
and ablations), measured in one process with the variants interleaved step by step.

    .venv/bin/python benchmarks/opt_levels.py MODEL [--variants "O0;O2"] [--steps 64] [--rounds 3]

MODEL is anything ``llmc compile`` reads (a .gguf file or a Hugging Face folder). Variants are
separated by ``;``: ``O<n>`` or a custom pass list in brackets, e.g.
``"O0;O2;[share-tied-weights,fuse-qkv,dce]"`` (``O0#2`` times O0 again as a control).
Every variant is compiled in memory (front end -> passes), loaded into the torch executor
and prefilled with the same prompt; then each decode step is run for every variant in turn
(order alternating), so all variants see the same background load. A variant must produce
the same greedy ids as the first one. ``--mode prefill`` times whole prefills instead.

Reported per variant: decode tok/s from the median step time (wall clock) and from the 10th
percentile step time (``p10``: the steps least disturbed by other jobs), and the median
over steps of the paired ratio ``step time of the first variant / step time of this one``
(> 1: faster). The paired ratio is what to read on a shared machine: neighbouring steps see
the same load. One torch thread by default (with two threads on a loaded 2-core machine,
torch's thread pool makes small kernels erratic).
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

from llmc.compiler.frontends.source import load_source
from llmc.compiler.ir.batch import BatchLayout
from llmc.driver import CompileOptions, frontend_module, optimize
from llmc.runtime.executor import StepBatch
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.target import TorchTarget


def compile_variant(model: str, variant: str) -> tuple[TorchExecutor, dict[str, dict[str, int]]]:
    """``variant``: ``O<n>`` or ``[pass,...]``, optionally with a ``#label`` suffix (to time one
    pipeline twice as a control: the two copies should measure the same)."""
    variant = variant.split("#")[0]
    source = load_source(model)
    module = frontend_module(source, None)
    target = TorchTarget()
    if variant.startswith("["):
        options = CompileOptions(passes=variant.strip("[]"))
    else:
        options = CompileOptions(opt_level=int(variant.lstrip("O")))
    module, _ = optimize(module, source.weights, options, target.capabilities().fused_ops, target.name,
                         target.preferred_passes(options.opt_level) if not options.passes else None)
    return TorchExecutor(module, source.weights), module.op_counts()


class Decoder:
    """One greedy sequence on one executor, stepped from outside."""

    def __init__(self, executor: TorchExecutor, prompt: list[int], steps: int) -> None:
        self.executor = executor
        block = executor.kv_spec().block_size
        blocks = -(-(len(prompt) + steps + 1) // block)
        executor.init_cache(blocks)
        self.table = list(range(blocks))
        n = len(prompt)
        logits = executor.step(StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [self.table], [n - 1]))
        self.ids = [int(np.argmax(logits[0]))]
        self.context = n

    def step(self) -> float:
        """One decode step; returns its wall seconds."""
        self.context += 1
        batch = StepBatch(np.asarray(self.ids[-1:]), BatchLayout((0,), (1,), (self.context,)), [self.table], [0])
        start = time.perf_counter()
        logits = self.executor.step(batch)
        elapsed = time.perf_counter() - start
        self.ids.append(int(np.argmax(logits[0])))
        return elapsed


def prefill_seconds(executor: TorchExecutor, prompt: list[int]) -> tuple[float, int]:
    """Wall seconds of one prefill of ``prompt`` into an empty cache, and the greedy next id."""
    block = executor.kv_spec().block_size
    blocks = -(-len(prompt) // block)
    executor.init_cache(blocks)
    n = len(prompt)
    batch = StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [list(range(blocks))], [n - 1])
    start = time.perf_counter()
    logits = executor.step(batch)
    return time.perf_counter() - start, int(np.argmax(logits[0]))


def measure_prefill(executors: dict[str, TorchExecutor], prompt: list[int], repeats: int) -> dict[str, list[float]]:
    variants = list(executors)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(repeats):
        ids = set()
        for v in variants if i % 2 == 0 else reversed(variants):
            seconds, token = prefill_seconds(executors[v], prompt)
            times[v].append(seconds)
            ids.add(token)
        if len(ids) != 1:
            raise SystemExit("variants disagree on the greedy token after the prompt")
    return times


def measure(executors: dict[str, TorchExecutor], prompt: list[int], steps: int, rounds: int
            ) -> dict[str, list[float]]:
    variants = list(executors)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        decoders = {v: Decoder(executors[v], prompt, steps) for v in variants}
        for i in range(steps):
            for v in variants if i % 2 == 0 else reversed(variants):
                times[v].append(decoders[v].step())
        first = decoders[variants[0]].ids
        for v, d in decoders.items():
            if d.ids != first:
                raise SystemExit(f"variant {v} gives different greedy ids than {variants[0]}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default="O0;O2")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--mode", choices=["decode", "prefill"], default="decode",
                    help="prefill: time one prefill of --prompt tokens, --steps times per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    prompt = [1 + (i * 7919) % 97 for i in range(args.prompt)]  # ids below 98: valid for any vocab

    executors, counts = {}, {}
    for v in variants:
        executors[v], counts[v] = compile_variant(args.model, v)
    if args.mode == "prefill":
        times = measure_prefill(executors, prompt, args.steps)
    else:
        times = measure(executors, prompt, args.steps, args.rounds)
    unit = args.prompt if args.mode == "prefill" else 1
    base = times[variants[0]]
    results = {
        "model": args.model,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "prompt": args.prompt,
        "mode": args.mode,
        "variants": {},
    }
    for v in variants:
        ratios = sorted(b / t for b, t in zip(base, times[v], strict=True))
        q = len(ratios) // 4
        results["variants"][v] = {
            "tok_s": round(unit / statistics.median(times[v]), 2),
            "tok_s_p10": round(unit / float(np.percentile(times[v], 10)), 2),
            "speedup_vs_first_median": round(statistics.median(ratios), 3),
            "speedup_vs_first_iqr": [round(ratios[q], 3), round(ratios[-q - 1], 3)],
            "decode_nodes": sum(counts[v]["decode"].values()),
            "decode_linear_ops": counts[v]["decode"].get("linear", 0),
        }
    print(f"{args.mode + ' variant':<64} {'tok/s':>7} {'p10':>7} {'speedup':>8} {'IQR':>13} {'nodes':>6} {'linear':>6}")
    for v, r in results["variants"].items():
        iqr = f"{r['speedup_vs_first_iqr'][0]:.3f}-{r['speedup_vs_first_iqr'][1]:.3f}"
        print(f"{v:<64} {r['tok_s']:>7.2f} {r['tok_s_p10']:>7.2f} "
              f"{r['speedup_vs_first_median']:>7.3f}x {iqr:>13} "
              f"{r['decode_nodes']:>6} {r['decode_linear_ops']:>6}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
