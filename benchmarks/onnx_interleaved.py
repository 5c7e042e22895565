#!/usr/bin/env python
"""Prefill and batch-1 decode of several llmc artifacts, interleaved round by round in one process.

    python benchmarks/onnx_interleaved.py ART [ART ...] --threads 2 --prompt-len 64 --gen-len 16 --rounds 5

On a machine shared with other jobs the load drifts over minutes; running every artifact once per
round (in rotating order) and taking per-artifact medians over rounds compares them under the
same load, which one-engine-after-another runs cannot. Greedy, EOS ignored, random prompt ids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.registry import get_target


def run_once(executor: Executor, prompt: list[int], gen: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, mean decode seconds per token, generated ids) for one sequence."""
    spec = executor.kv_spec()
    executor.init_cache(1 if spec.layout == "slots" else -(-(len(prompt) + gen) // spec.block_size))
    table = [0] if spec.layout == "slots" else list(range(-(-(len(prompt) + gen) // spec.block_size)))
    n = len(prompt)
    t0 = time.perf_counter()
    logits = executor.step(StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [table], [n - 1]))
    t1 = time.perf_counter()
    out = [int(logits[0].argmax())]
    for i in range(gen - 1):
        logits = executor.step(StepBatch(np.asarray(out[-1:]), BatchLayout((0,), (1,), (n + i + 1,)), [table], [0]))
        out.append(int(logits[0].argmax()))
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(gen - 1, 1), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    executors = {}
    for path in args.artifacts:
        artifact = Artifact.load(path)
        executors[str(path)] = get_target(artifact.target).load(artifact, threads=args.threads)
    vocab = next(iter(executors.values())).config.vocab_size
    prompt = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in executors}
    tokens: dict[str, list[int]] = {}
    names = list(executors)
    for _ in range(1):  # warm-up
        for name in names:
            tokens[name] = run_once(executors[name], prompt, args.gen_len)[2]
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            prefill, decode, _ = run_once(executors[name], prompt, args.gen_len)
            times[name].append((prefill, decode))
    rows = []
    for name in names:
        pre = float(np.median([p for p, _ in times[name]]))
        dec = float(np.median([d for _, d in times[name]]))
        rows.append({"artifact": name, "prefill_tok_s": args.prompt_len / pre, "decode_tok_s": 1.0 / dec,
                     "greedy_equal_first": tokens[name] == tokens[names[0]]})
        print(f"{name:40s} prefill {args.prompt_len / pre:8.1f} tok/s  decode {1.0 / dec:7.2f} tok/s  "
              f"greedy==first {tokens[name] == tokens[names[0]]}")
    import os

    print(f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"artifacts": [str(a) for a in args.artifacts],
                                                                     "json": str(args.json)},
                                         "rows": rows, "load_average": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
