#!/usr/bin/env python
"""Aggregate throughput of ``llmc serve`` in one process and on Ray Serve with 1..N replicas,
under the same load (``benchmarks/http_load.py``: concurrent streamed requests from the official
``openai`` client), one engine thread per replica.

    python benchmarks/scaleout_load.py out/smol --vocab-size 49152 --replicas 1,2 --concurrency 32 \\
        --prompt-len 128 --gen-len 64 --json scaleout.json

Each configuration starts its own server (the Ray ones start and stop a local Ray instance),
waits for ``/health``, runs http_load.py's sweep against it and stops it. The table has one row
per (server, concurrency) with http_load's aggregate, decode and prefill throughputs and the
ratio of aggregate throughput to the single-process server's at the same concurrency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_server import llmc_server

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="The artifact to serve.")
    parser.add_argument("--vocab-size", type=int, required=True, help="Its vocabulary size (for the random prompts).")
    parser.add_argument("--replicas", default="1,2", help="Ray Serve replica counts to measure.")
    parser.add_argument("--cpus-per-replica", default="1", help="Ray CPUs each replica reserves.")
    parser.add_argument("--no-single", action="store_true", help="Skip the single-process server.")
    parser.add_argument("--concurrency", default="32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", dest="json_out", help="Write every configuration's report here.")
    args = parser.parse_args(argv)
    configs: list[tuple[str, list[str]]] = [] if args.no_single else [("single process", [])]
    configs += [(f"ray serve, {n} replica{'s' if n != '1' else ''}",
                 ["--replicas", n, "--cpus-per-replica", args.cpus_per_replica]) for n in args.replicas.split(",")]
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in configs:
            out = Path(tmp) / f"{len(reports)}.json"
            serve_args = ["--served-model-name", "bench", "--threads", "1", *extra]
            with llmc_server(args.artifact, serve_args, Path(tmp) / "server.log", timeout=600.0) as server:
                cmd = [sys.executable, str(HERE / "http_load.py"), "--base-url", f"{server.url}/v1",
                       "--model", "bench", "--vocab-size", str(args.vocab_size), "--label", label,
                       "--concurrency", args.concurrency, "--prompt-len", str(args.prompt_len),
                       "--gen-len", str(args.gen_len), "--warmup", str(args.warmup), "--repeat", str(args.repeat),
                       "--json", str(out), "--quiet"]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            reports[label] = json.loads(out.read_text())
    base = {r["size"]: r["aggregate_tok_s"] for r in next(iter(reports.values()))["results"]}
    print("| server | clients | aggregate tok/s | decode tok/s | prefill tok/s | TTFT p50 s | vs first |")
    print("|---|---|---|---|---|---|---|")
    for label, report in reports.items():
        for r in report["results"]:
            ratio = r["aggregate_tok_s"] / base[r["size"]] if base.get(r["size"]) else float("nan")
            print(f"| {label} | {r['size']} | {r['aggregate_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                  f"{r['prefill_tok_s']:.1f} | {r['ttft_s']['p50']:.2f} | {ratio:.2f}x |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
