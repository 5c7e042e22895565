#!/usr/bin/env python
"""Logits of two artifacts of the same model over one ragged schedule (prefill chunks and decode
tokens of several sequences mixed): max |a-b|, relative L2 error and top-1 agreement per step.

    python benchmarks/gpu/parity.py A B [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.registry import get_target


def schedule(vocab: int, seed: int = 0) -> list[dict[int, list[int]]]:
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(0, vocab, n).tolist()
    return [{0: ids(37), 1: ids(5)}, {0: ids(1), 1: ids(64), 2: ids(9)}, {0: ids(1), 1: ids(1), 2: ids(1)},
            *({0: ids(1), 1: ids(1), 2: ids(1)} for _ in range(8))]


def run(path: str, steps: list[dict[int, list[int]]]) -> list[np.ndarray]:
    art = Artifact.load(path)
    ex = get_target(art.target).load(art)
    spec = ex.kv_spec()
    slots = spec.layout == "slots"
    per_seq = 16
    ex.init_cache(4 if slots else per_seq * 4)
    lengths: dict[int, int] = {}
    out = []
    for chunks in steps:
        seqs = list(chunks)
        q = tuple(len(chunks[s]) for s in seqs)
        ctx = tuple(lengths.get(s, 0) + n for s, n in zip(seqs, q, strict=True))
        layout = BatchLayout(tuple(seqs), q, ctx)
        tables = [[s] if slots else list(range(s * per_seq, (s + 1) * per_seq)) for s in seqs]
        ids = np.concatenate([np.asarray(chunks[s]) for s in seqs])
        out.append(ex.step(StepBatch(ids, layout, tables, np.arange(layout.num_tokens))))
        lengths.update(zip(seqs, ctx, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    steps = schedule(Artifact.load(args.a, verify=False).config.vocab_size)
    rows = []
    for i, (x, y) in enumerate(zip(run(args.a, steps), run(args.b, steps), strict=True)):
        rows.append({"step": i, "rows": int(x.shape[0]), "max_abs": float(np.abs(x - y).max()),
                     "rel_l2": float(np.linalg.norm(x - y) / np.linalg.norm(y)),
                     "top1_agree": float((x.argmax(-1) == y.argmax(-1)).mean()), "finite": bool(np.isfinite(x).all())})
        print(json.dumps(rows[-1]))
    worst = {"max_abs": max(r["max_abs"] for r in rows), "rel_l2": max(r["rel_l2"] for r in rows),
             "top1_agree": min(r["top1_agree"] for r in rows), "a": args.a, "b": args.b}
    print("worst", json.dumps(worst))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"steps": rows, "worst": worst}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
