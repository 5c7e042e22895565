"""Constrained decoding's cost: a batch whose every request is grammar-constrained against the
same batch unconstrained (and a half-and-half batch), on the continuous-batching engine.

Every request samples at temperature 1 for exactly ``--tokens`` tokens (the constraint is a JSON
Schema whose shortest instance is longer than that, EOS is ignored in the free rows), so both
batches do the same number of steps; the figure is aggregate decode tok/s (generated tokens /
wall time, submission to last completion), median of ``--repeats`` runs that alternate the modes.

    /work/bin/cpu-exclusive .venv/bin/python benchmarks/structured_batch.py out/smol --batch 8 --tokens 64

``out/smol`` is SmolLM2-135M-Instruct compiled with ``llmc compile ... --quant native``.
Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from llmc.runtime.engine import Engine
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.structured import Constraint

SCHEMA = {
    "type": "object",
    "properties": {"fruits": {"type": "array", "minItems": 40, "maxItems": 60,
                              "items": {"type": "object", "properties": {
                                  "name": {"type": "string", "minLength": 3, "maxLength": 16},
                                  "color": {"enum": ["red", "green", "yellow", "orange", "purple"]},
                                  "grams": {"type": "integer", "minimum": 1, "maximum": 999}},
                                  "required": ["name", "color", "grams"], "additionalProperties": False}}},
    "required": ["fruits"], "additionalProperties": False,
}


def run(engine: Engine, prompt: list[int], batch: int, tokens: int, constrained: int) -> dict[str, Any]:
    """``batch`` requests, the first ``constrained`` of them under the schema."""
    constraint = Constraint.json_schema(SCHEMA)
    params = [SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True,
                             constraint=constraint if i < constrained else None) for i in range(batch)]
    t0 = time.perf_counter()
    outs = engine.generate([prompt] * batch, params)
    wall = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    if any(len(o.token_ids) != tokens for o in outs):
        raise RuntimeError("a request stopped early; the comparison needs equal work")
    return {"wall_s": wall, "tok_s": generated / wall,
            "tpot_ms": statistics.median(o.timings["tpot_s"] for o in outs) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    modes = {"unconstrained": 0, "half constrained": args.batch // 2, "all constrained": args.batch}
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    with Engine.load(str(args.artifact), max_running=args.batch, threads=args.threads, prefix_caching=False) as engine:
        tok = engine.tokenizer
        assert tok is not None
        prompt = tok.encode_chat([{"role": "user", "content": "List fruits with their color and weight as JSON."}])
        engine.check_constraint(Constraint.json_schema(SCHEMA))  # compiled once, outside the timings
        for k in modes.values():  # warm-up
            run(engine, prompt, args.batch, 4, k)
        for _ in range(args.repeats):
            for mode, k in modes.items():
                results[mode].append(run(engine, prompt, args.batch, args.tokens, k))
    base = statistics.median(r["tok_s"] for r in results["unconstrained"])
    summary = {}
    print(f"batch {args.batch}, {args.tokens} tokens each, median of {args.repeats}")
    for mode, runs in results.items():
        tok_s = statistics.median(r["tok_s"] for r in runs)
        tpot = statistics.median(r["tpot_ms"] for r in runs)
        summary[mode] = {"tok_s": tok_s, "tpot_ms": tpot, "x_unconstrained": tok_s / base,
                         "runs_tok_s": [r["tok_s"] for r in runs]}
        print(f"  {mode:18s} {tok_s:8.1f} tok/s  TPOT {tpot:6.1f} ms  x{tok_s / base:.3f}  "
              f"(runs: {', '.join(format(r['tok_s'], '.1f') for r in runs)})")
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "tokens": args.tokens, "modes": summary}, indent=1))


if __name__ == "__main__":
    main()
