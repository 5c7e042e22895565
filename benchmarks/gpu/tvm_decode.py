#!/usr/bin/env python
"""Decode throughput of tvm CUDA artifacts per batch bucket against the HBM roofline, as raw JSON.

For each artifact and batch size ``B``: ``B`` sequences prefilled with ``--context`` random tokens
(chunks of ``--prefill-seqs`` sequences; prefill tok/s recorded), then ``--steps`` greedy decode steps
two ways:

* ``engine_path``: :meth:`Executor.step` as the engine calls it: page tables built and copied in,
  the bucket's function (its CUDA graph) run, logits copied to the host, argmax on the host;
* ``device``: the bucket's call replayed (:meth:`TvmExecutor.bucket_call`: the captured graph
  relaunched on the same inputs, no host transfer), timed over ``--steps`` calls with one sync:
  what the GPU does per step.

The roofline of a step is its bytes over the copy bandwidth measured in the same run (a
device-to-device copy of ``--copy-gib`` GiB through torch, bytes read plus written): all weight
bytes (the parameters on the device, read once per step) plus the KV bytes the step reads
(``B`` sequences x the context x layers x 2 x kv heads x head dim x the cache dtype's size).

    python benchmarks/gpu/tvm_decode.py ART [ART ...] --batch-sizes 1,32,256 --json OUT.json

``--dry-run`` (CPU builds, no GPU) runs the same code with its sizes cut down and no bandwidth copy,
to check the script before a device session.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.registry import get_target

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "uint32": 4}


def copy_bandwidth(gib: float) -> dict[str, Any] | None:
    """Device-to-device copy bandwidth (bytes read + written per second) through torch; None without it."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_moved": 2 * n, "seconds": seconds, "bytes_per_s": 2 * n / seconds,
            "device_name": torch.cuda.get_device_name(0), "torch": torch.__version__}


def tensor_bytes(t: Any) -> int:
    return int(np.prod([int(d) for d in t.shape])) * DTYPE_BYTES[str(t.dtype)]


def run_batch(ex: Any, vocab: int, batch: int, context: int, steps: int, prefill_seqs: int,
              rng: np.random.Generator) -> dict[str, Any]:
    page = ex.page_size
    per_seq = -(-(context + 2 * steps + 4) // page)
    ex.init_cache(batch * per_seq)
    tables = [list(range(j * per_seq, (j + 1) * per_seq)) for j in range(batch)]
    last = np.zeros(batch, np.int64)
    sync = ex.dev.sync
    t0 = time.perf_counter()
    for lo in range(0, batch, prefill_seqs):
        seqs = tuple(range(lo, min(batch, lo + prefill_seqs)))
        layout = BatchLayout(seqs, (context,) * len(seqs), (context,) * len(seqs))
        logits = ex.step(StepBatch(rng.integers(0, vocab, len(seqs) * context), layout,
                                   [tables[j] for j in seqs], layout.last_token_rows()))
        last[lo:lo + len(seqs)] = logits.argmax(-1)
    sync()
    prefill_s = time.perf_counter() - t0
    seqs = tuple(range(batch))
    ctx = context

    def decode_batch(tokens: np.ndarray, ctx: int) -> StepBatch:
        return StepBatch(tokens, BatchLayout(seqs, (1,) * batch, (ctx,) * batch), tables, np.arange(batch))

    generated = []
    for _ in range(2):  # warm-up: the first call of a bucket captures its CUDA graph
        ctx += 1
        last = ex.step(decode_batch(last, ctx)).argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        ctx += 1
        last = ex.step(decode_batch(last, ctx)).argmax(-1)
        generated.append(int(last[0]))
    sync()
    engine_s = (time.perf_counter() - t0) / steps
    ctx += 1
    run = ex.bucket_call(decode_batch(last, ctx))
    device_s = None
    if run is not None:
        run()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        device_s = (time.perf_counter() - t0) / steps
    bucket = ex.decode_bucket(batch)
    return {"batch": batch, "bucket": bucket, "context_start": context, "context_end": ctx, "steps": steps,
            "prefill_tokens": batch * context, "prefill_s": prefill_s, "prefill_tok_s": batch * context / prefill_s,
            "engine_path_step_s": engine_s, "engine_path_tok_s": batch / engine_s,
            "device_step_s": device_s, "device_tok_s": None if device_s is None else batch / device_s,
            "greedy_seq0": generated, "kv_context_mean": (context + ctx) / 2}


def bench_artifact(path: Path, batches: list[int], context: int, steps: int, prefill_seqs: int,
                   bandwidth: float | None) -> dict[str, Any]:
    art = Artifact.load(path)
    t0 = time.perf_counter()
    ex = get_target(art.target).load(art)
    load_s = time.perf_counter() - t0
    c = art.config
    weight_bytes = sum(tensor_bytes(t) for t in ex.params)
    kv_token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * DTYPE_BYTES[ex.payload["kv_dtype"]]
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        row = run_batch(ex, c.vocab_size, b, context, steps, prefill_seqs, rng)
        step_bytes = weight_bytes + b * row["kv_context_mean"] * kv_token_bytes
        row["bytes_per_step"] = step_bytes
        if bandwidth:
            row["roofline_step_s"] = step_bytes / bandwidth
            row["roofline_tok_s"] = b * bandwidth / step_bytes
            for key in ("engine_path", "device"):
                s = row[f"{key}_step_s"]
                row[f"{key}_roofline_pct"] = None if s is None else 100 * row["roofline_step_s"] / s
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("batch", "bucket", "device_tok_s", "engine_path_tok_s",
                                               "prefill_tok_s")} | {"pct": row.get("device_roofline_pct")}),
              flush=True)
    manifest = art.manifest
    return {"artifact": str(path), "quant": manifest.get("compile_options", {}).get("quant"),
            "target_options": manifest["target"]["options"], "notes": manifest["target"]["notes"],
            "model": {"num_layers": c.num_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size},
            "load_s": load_s, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token_bytes, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--batch-sizes", default="1,32,256")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--prefill-seqs", type=int, default=32, help="sequences per prefill step")
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU artifacts, small sizes: checks the script")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.dry_run:
        args.context, args.steps = min(args.context, 8), min(args.steps, 2)
    bw = None if args.dry_run else copy_bandwidth(args.copy_gib)
    if bw:
        print(f"copy bandwidth {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw['device_name']})", flush=True)
    result: dict[str, Any] = {"script": "benchmarks/gpu/tvm_decode.py", "argv": sys.argv[1:],
                              "host": platform.node(), "python": platform.python_version(), "copy": bw,
                              "dry_run": args.dry_run, "artifacts": []}
    for path in args.artifacts:
        try:
            result["artifacts"].append(bench_artifact(path, batches, args.context, args.steps, args.prefill_seqs,
                                                      bw["bytes_per_s"] if bw else None))
        except Exception as exc:  # one artifact's failure must not lose the others' figures
            result["artifacts"].append({"artifact": str(path), "error": f"{type(exc).__name__}: {exc}"})
            print(f"{path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all("error" not in a for a in result["artifacts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
