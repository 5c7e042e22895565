"""Quantization table: perplexity, KL, artifact size, peak memory and decode tok/s per scheme.

    .venv/bin/python benchmarks/quant_table.py MODEL [--variants baseline,fp16,...] [--json OUT]

MODEL is anything ``llmc compile`` reads; its tokenizer encodes the texts (stories260k: use the
GGUF, the HF folder has no tokenizer). Every variant is compiled to an artifact with the
``llmc compile`` options below (default pipeline O2, torch target), then measured in a *fresh*
worker process so that peak resident memory belongs to that variant alone:

* size: bytes of ``weights/model.safetensors``;
* memory: VmRSS after loading the artifact (and its growth over the RSS of the bare Python
  process, so including the torch import), and the peak (``ru_maxrss``) after decoding, in MiB;
* decode tok/s: greedy generation of ``--decode-tokens`` tokens after a 16-token prompt (the
  median of ``--rounds`` runs), with ``--threads`` torch threads;
* ppl / KL / top-1: ``llmc.runtime.evaluate.evaluate`` on ``--eval-text`` (held out: it is not
  the calibration text), KL(baseline || variant) against the baseline's logits, which the
  baseline worker saves once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "fp16": ["--quant", "fp16"],
    "bf16": ["--quant", "bf16"],
    "int8": ["--quant", "int8"],
    "int4-g32": ["--quant", "int4", "--group-size", "32"],
    "int4-g64": ["--quant", "int4", "--group-size", "64"],
    "int4-g128": ["--quant", "int4", "--group-size", "128"],
    "int4-g32-awq": ["--quant", "int4", "--group-size", "32", "--calib-file", str(DATA / "calib.txt")],
    "int4-g128-awq": ["--quant", "int4", "--group-size", "128", "--calib-file", str(DATA / "calib.txt")],
    "int4-g32-sym": ["--quant", "int4", "--group-size", "32", "--sym"],
    "int4-g32-sym-awq": ["--quant", "int4", "--group-size", "32", "--sym", "--calib-file", str(DATA / "calib.txt")],
    "native": ["--quant", "native"],
}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """Measure one artifact (runs in its own process); prints one JSON line."""
    rss0 = _peak_mib()
    import numpy as np

    from llmc.runtime.evaluate import evaluate, reference_logits
    from llmc.runtime.generate import generate_ids
    from llmc.runtime.loader import load_model
    from llmc.runtime.sampling import SamplingParams

    ids = json.loads(Path(args.ids).read_text())
    model = load_model(args.worker, threads=args.threads)
    loaded = _rss_mib()
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(args.rounds):
        result = generate_ids(model, ids[:16], params)
        rates.append(result.timings["decode_tok_s"])
    peak = _peak_mib()
    ref_path = Path(args.ref)
    if args.save_ref:
        ref = reference_logits(model.executor, ids)
        np.savez(ref_path, positions=np.asarray([p for p, _ in ref]), logits=np.stack([x for _, x in ref]))
    data = np.load(ref_path)
    ref_list = list(zip(data["positions"].tolist(), data["logits"], strict=True))
    ev = evaluate(model.executor, ids, reference=ref_list)
    print(json.dumps({"rss0_mib": rss0, "loaded_mib": loaded, "peak_mib": peak,
                      "decode_tok_s": statistics.median(rates), "greedy": result.token_ids[:16], **ev.to_dict()}))


def run_variant(model: str, name: str, extra: list[str], work: Path, ids_path: Path, args: argparse.Namespace,
                save_ref: bool) -> dict[str, Any]:
    out = work / name
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmc.cli", "compile", model, "-o", str(out), *extra],
                          capture_output=True, text=True)
    compile_s = time.perf_counter() - start
    if proc.returncode != 0:
        return {"variant": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1]}
    manifest = json.loads((out / "manifest.json").read_text())
    size = manifest["files"]["weights/model.safetensors"]["bytes"]
    cmd = [sys.executable, __file__, "--worker", str(out), "--ids", str(ids_path), "--ref", str(work / "ref.npz"),
           "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens), "--rounds", str(args.rounds)]
    if save_ref:
        cmd.append("--save-ref")
    measured = subprocess.run(cmd, capture_output=True, text=True)
    if measured.returncode != 0:
        return {"variant": name, "error": measured.stderr.strip().splitlines()[-1]}
    row = json.loads(measured.stdout.strip().splitlines()[-1])
    types: dict[str, int] = {}
    for record in manifest["params"].values():
        key = record.get("quant") or record.get("dtype")
        types[key] = types.get(key, 0) + 1
    return {"variant": name, "options": " ".join(extra), "compile_s": compile_s, "weights_bytes": size,
            "weight_types": types, "calibration": (manifest.get("quantization") or {}).get("calibration"), **row}


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["variant"] == "baseline" and "error" not in r), None)
    lines = ["| variant | ppl | Δppl | KL | top-1 | weights MiB | RSS after load MiB (Δ vs Python start) "
             "| peak RSS MiB | decode tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | n/a: {r['error']} | | | | | | | |")
            continue
        dppl = "" if base is None else f"{(float(r['perplexity']) / float(base['perplexity']) - 1) * 100:+.2f}%"
        peak, rss0, loaded = float(r["peak_mib"]), float(r["rss0_mib"]), float(r["loaded_mib"])
        lines.append(
            f"| {r['variant']} | {float(r['perplexity']):.4f} | {dppl} | {float(r['kl_mean']):.5f} | "
            f"{float(r['top1_agreement']) * 100:.1f}% | {int(r['weights_bytes']) / 2**20:.2f} | "
            f"{loaded:.0f} ({loaded - rss0:+.0f}) | {peak:.0f} | {float(r['decode_tok_s']):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--eval-text", default=str(DATA / "heldout.txt"))
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="Write the rows here.")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-ref", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.model:
        parser.error("MODEL is required")
    from llmc.compiler.frontends.source import load_source

    tokenizer = load_source(args.model).tokenizer
    if tokenizer is None:
        sys.exit(f"{args.model} has no tokenizer; use a source with one (for stories260k: the GGUF)")
    ids = tokenizer.encode(Path(args.eval_text).read_text())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmc-quant-table-"))
    work.mkdir(parents=True, exist_ok=True)
    ids_path = work / "eval_ids.json"
    ids_path.write_text(json.dumps(ids))
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if names[0] != "baseline" and not (work / "ref.npz").exists():  # a workdir's baseline logits are reused
        names.insert(0, "baseline")
    rows = []
    for name in names:
        row = run_variant(args.model, name, VARIANTS[name], work, ids_path, args, save_ref=name == "baseline")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = (f"model {args.model}; eval {args.eval_text} ({len(ids)} tokens); {args.threads} torch thread(s); "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(header)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
