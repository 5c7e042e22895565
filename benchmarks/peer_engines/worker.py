"""One engine in its own process (so peak RSS and thread settings do not leak between engines):
read the run's spec, time every point, write ``{info, rows, tokens}`` (or ``{error}``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llmc.runtime.bench import BenchSettings, make_prompts, progress_bar
from llmc.runtime.bench.harness import run_backend

from . import make_backend


def run_worker(spec_path: Path, out_path: Path) -> None:
    """Run the engine of ``spec_path`` over every point and write the result to ``out_path``."""
    spec = json.loads(spec_path.read_text())
    s = spec["settings"]
    settings = BenchSettings(scenarios=tuple(s["scenarios"]), batch_sizes=tuple(s["batch_sizes"]),
                             concurrency=tuple(s["concurrency"]), prompt_len=s["prompt_len"], gen_len=s["gen_len"],
                             warmup=s["warmup"], repeat=s["repeat"], seed=s["seed"], threads=s["threads"])
    try:
        backend = make_backend(spec)
    except Exception as exc:
        out_path.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return
    # greedy tokens of one fixed batch, to check that every engine runs the same model
    probe = make_prompts(2, settings.prompt_len, spec["vocab_size"], settings.seed, 10_000)
    try:
        tokens = backend.run_batch(probe, min(settings.gen_len, 8)).token_ids
    except Exception as exc:
        tokens = None
        print(f"probe failed: {exc}", file=sys.stderr)
    advance, close = progress_bar(len(settings.points()) * (settings.warmup + settings.repeat), spec.get("quiet"))
    try:
        info, rows = run_backend(backend, settings, spec["vocab_size"], spec["bandwidth"], advance)
    finally:
        close()
    info = backend.info()  # after the runs: includes compile time
    backend.close()
    out_path.write_text(json.dumps({"info": info.to_dict(), "rows": rows, "tokens": tokens}))
