#!/usr/bin/env python
"""The torch target's CUDA path on one GPU, in one command that keeps to a time budget (issues 17, 18).

    python benchmarks/gpu/torch_cuda.py --out "$OUT" [--budget-s 450] [--stages a,b,...] [--dry-run]

Stages, in priority order (each runs as a subprocess with what is left of the budget; a stage whose
inputs failed is skipped; every raw JSON goes to ``--out``, at most 8 files, as the device tool returns):

- ``env``: nvidia-smi, torch, triton and CUDA versions;
- ``roofline``: device-to-device copy bandwidth (bytes read + written over the median of event-timed
  copies of a 1 GiB buffer, 2 GiB moved) and the bf16 matmul rate on random data;
- ``synth``, ``compile``: ``llmc synth --preset llama-3.2-1b`` (bf16) compiled for the torch target on
  cuda with bf16 activations, unquantized and ``--quant int4``;
- ``decode``: the executor alone (this file's ``measure`` subcommand): greedy decode steps launched and
  collected one by one at batch 1/32/256 (graph buckets), median step time -> tok/s, against the
  roofline (weight bytes + KV bytes read per step over the measured bandwidth); prefill of 32 x 512;
  greedy tokens of the graph path against the eager torch path (``cuda_executor=eager``);
- ``tests``: ``tests/targets/torch_cuda`` on the GPU (compiled kernels, graphs on);
- ``bench``: ``llmc bench`` single + batch 1,32,256 for both artifacts (raw JSON);
- ``peers``: ``benchmarks/peers.py`` with transformers' StaticCache + torch.compile (``hf-compile``)
  beside the bf16 artifact, batch 1 and 32, same prompts and lengths;
- ``serve``: ``llmc bench --scenario concurrency --concurrency 100,256`` on the bf16 artifact (issue 18).

``--dry-run`` prints the plan and writes ``summary.json`` with every stage ``planned``, touching no GPU:
what tests/benchmarks/test_gpu_torch_cuda.py checks on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "llmc-torch-cuda-device/1"
STAGES = ("env", "roofline", "synth", "compile", "decode", "tests", "bench", "peers", "serve")
STATUSES = ("planned", "ok", "failed", "timeout", "skipped")
DECODE_BATCHES = (1, 32, 256)
PREFILL = (32, 512)
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    name: str
    cmd: list[str]
    needs: tuple[str, ...] = ()
    cap_s: float = 600.0
    output: str | None = None
    """The file under ``--out`` this stage writes (its raw JSON or log)."""
    status: str = "planned"
    seconds: float = 0.0
    tail: str = ""


@dataclass
class Plan:
    out: Path
    work: Path
    budget_s: float
    stages: list[Stage] = field(default_factory=list)


def build_plan(out: Path, work: Path, budget_s: float, stages: tuple[str, ...], python: str) -> Plan:
    """The commands of each stage asked for (in :data:`STAGES` order)."""
    llmc = [python, "-m", "llmc"]
    hf, bf16, int4 = work / "llama-3.2-1b", work / "torch-bf16", work / "torch-int4"
    lens = ["--prompt-len", "128", "--gen-len", "64", "--warmup", "1", "--repeat", "2", "--quiet"]
    this = [python, str(Path(__file__).resolve())]
    compile_args = ["--target", "torch", "--device", "cuda", "--target-option", "activation_dtype=bfloat16"]
    py = shlex.quote(python)
    all_stages = {
        "env": Stage("env", ["bash", "-c", "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm "
                             f"--format=csv; {py} -c \"import torch, triton; print('torch', torch.__version__, "
                             "'cuda', torch.version.cuda, 'triton', triton.__version__)\""], cap_s=60),
        "roofline": Stage("roofline", [*this, "roofline", "--json", str(out / "roofline.json")], cap_s=90,
                          output="roofline.json"),
        "synth": Stage("synth", [*llmc, "synth", "--preset", "llama-3.2-1b", "--dtype", "bfloat16", "--seed", "0",
                                 "-o", str(hf)], cap_s=180),
        "compile": Stage("compile", ["bash", "-c", " && ".join(
            shlex.join([*llmc, "compile", str(hf), *compile_args, *quant, "-o", str(art)])
            for quant, art in (([], bf16), (["--quant", "int4"], int4)))], needs=("synth",), cap_s=300),
        "decode": Stage("decode", [*this, "measure", "--artifact", str(bf16), "--artifact", str(int4),
                                   "--roofline", str(out / "roofline.json"), "--json", str(out / "decode.json")],
                        needs=("compile",), cap_s=240, output="decode.json"),
        "tests": Stage("tests", ["bash", "-c", f"{py} -m pytest -q -p no:cacheprovider -x tests/targets/torch_cuda "
                                 f"2>&1 | tail -40 > {shlex.quote(str(out / 'pytest.log'))}; "
                                 "exit ${PIPESTATUS[0]}"], cap_s=180, output="pytest.log"),
        "bench": Stage("bench", ["bash", "-c", " && ".join(
            shlex.join([*llmc, "bench", str(art), "--scenario", "single,batch", "--batch-sizes", "1,32,256", *lens,
                        "--json", str(out / f"bench-torch-{name}.json")])
            for name, art in (("bf16", bf16), ("int4", int4)))], needs=("compile",), cap_s=300,
            output="bench-torch-bf16.json bench-torch-int4.json"),
        "peers": Stage("peers", [python, str(REPO / "benchmarks" / "peers.py"), "--name", "llama-3.2-1b-synth",
                                 "--llmc", str(bf16), "--hf", str(hf), "--hf-dtype", "bfloat16",
                                 "--engines", "hf-compile", "--device", "cuda", "--scenario", "batch",
                                 "--batch-sizes", "1,32", *lens, "--work-dir", str(work / "peers"),
                                 "--json", str(out / "peers.json")], needs=("compile",), cap_s=360,
                       output="peers.json"),
        "serve": Stage("serve", [*llmc, "bench", str(bf16), "--scenario", "concurrency", "--concurrency", "100,256",
                                 *lens, "--json", str(out / "concurrency.json")], needs=("compile",), cap_s=240,
                       output="concurrency.json"),
    }
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return Plan(out, work, budget_s, [all_stages[s] for s in STAGES if s in stages])


def run_plan(plan: Plan, dry_run: bool) -> dict[str, Any]:
    """Run each stage within what is left of the budget; returns (and writes) the summary."""
    plan.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    done: dict[str, str] = {}
    for stage in plan.stages:
        left = plan.budget_s - (time.monotonic() - start)
        blocked = [n for n in stage.needs if done.get(n, "ok") != "ok"]
        if dry_run:
            stage.status = "planned"
        elif blocked or left < 20:
            stage.status, stage.tail = "skipped", f"needs {blocked}" if blocked else f"{left:.0f} s left"
        else:
            t0 = time.monotonic()
            print(f"== {time.strftime('%H:%M:%S')} {stage.name} (up to {min(stage.cap_s, left):.0f} s)", flush=True)
            try:
                proc = subprocess.run(stage.cmd, cwd=REPO, capture_output=True, text=True,
                                      timeout=min(stage.cap_s, left), env={**os.environ, "PYTHONUNBUFFERED": "1"})
                stage.status = "ok" if proc.returncode == 0 else "failed"
                stage.tail = (proc.stdout + proc.stderr)[-1500:]
            except subprocess.TimeoutExpired as exc:
                stage.status = "timeout"
                stage.tail = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                              else str(exc.stdout or ""))[-1500:]
            stage.seconds = round(time.monotonic() - t0, 1)
            print(stage.tail[-600:], flush=True)
        done[stage.name] = stage.status
    summary = {"schema": SCHEMA, "budget_s": plan.budget_s, "dry_run": dry_run,
               "elapsed_s": round(time.monotonic() - start, 1), "work": str(plan.work),
               "stages": [asdict(s) for s in plan.stages]}
    (plan.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for s in plan.stages:
        print(f"{s.name:9s} {s.status:8s} {s.seconds:7.1f} s  {s.output or ''}")
    return summary


# -- measurements run on the GPU (subcommands) ------------------------------------------------------
def _median_ms(fn: Any, repeat: int) -> float:
    import torch

    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def roofline(json_path: Path) -> dict[str, Any]:
    """Copy bandwidth (read + write) of a 1 GiB device buffer (2 GiB moved) and the bf16 matmul rate on random data."""
    import torch

    n = 2**30 // 2  # bf16 elements of 1 GiB; src + dst = 2 GiB
    buffers = [torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda",
                                                                             dtype=torch.bfloat16)]
    copy = lambda: buffers[1].copy_(buffers[0])
    for _ in range(3):
        copy()
    ms = _median_ms(copy, 20)
    copy_bytes = 2 * n * 2
    buffers.clear()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    mm = _median_ms(lambda: a @ b, 10)
    out = {"device": torch.cuda.get_device_name(), "copy_bytes": copy_bytes, "copy_ms": ms,
           "bandwidth_bytes_per_s": copy_bytes / (ms / 1e3), "matmul_8192_bf16_ms": mm,
           "matmul_tflops": 2 * 8192**3 / (mm / 1e3) / 1e12}
    json_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return out


def _decode_steps(executor: Any, batch: int, context: int, steps: int, start_id: int = 3) -> dict[str, Any]:
    """Greedy decode of ``batch`` sequences after a ``context``-token prefill, launched and collected step
    by step; median step time over ``steps`` steps after two warm-up steps (which capture the graph)."""
    import numpy as np

    from llmc.compiler.ir.batch import BatchLayout
    from llmc.runtime.executor import StepBatch
    from llmc.runtime.sampling import SampleRow, SamplingParams

    bs = executor.kv_spec().block_size
    per_seq = -(-(context + steps + 2) // bs)
    tables = [list(range(j * per_seq, (j + 1) * per_seq)) for j in range(batch)]
    rng = np.random.default_rng(batch)
    greedy = SampleRow(SamplingParams(temperature=0, max_tokens=steps + 2))
    seqs = tuple(range(batch))
    ids = rng.integers(start_id, executor.config.vocab_size, batch * context)
    layout = BatchLayout(seqs, (context,) * batch, (context,) * batch)
    last = np.asarray(layout.last_token_rows())
    tokens = executor.launch(StepBatch(ids, layout, tables, last), [greedy] * batch).result().token_ids
    times, generated = [], [tokens]
    for i in range(steps + 2):
        ctx = context + i + 1
        t0 = time.perf_counter()
        out = executor.launch(StepBatch(tokens, BatchLayout(seqs, (1,) * batch, (ctx,) * batch), tables,
                                        np.arange(batch)), [greedy] * batch).result()
        times.append(time.perf_counter() - t0)
        tokens = out.token_ids
        generated.append(tokens)
    med = sorted(times[2:])[len(times[2:]) // 2]
    return {"batch": batch, "context": context, "steps": steps, "step_ms_median": med * 1e3,
            "tok_s": batch / med, "first_steps_ms": [round(t * 1e3, 2) for t in times[:2]],
            "tokens": np.stack(generated).T.tolist()}


def _prefill(executor: Any, batch: int, length: int, repeat: int = 3) -> dict[str, Any]:
    import numpy as np

    from llmc.compiler.ir.batch import BatchLayout
    from llmc.runtime.executor import StepBatch
    from llmc.runtime.sampling import SampleRow, SamplingParams

    bs = executor.kv_spec().block_size
    per_seq = -(-length // bs)
    tables = [list(range(j * per_seq, (j + 1) * per_seq)) for j in range(batch)]
    ids = np.random.default_rng(0).integers(3, executor.config.vocab_size, batch * length)
    layout = BatchLayout(tuple(range(batch)), (length,) * batch, (length,) * batch)
    step = StepBatch(ids, layout, tables, np.asarray(layout.last_token_rows()))
    greedy = [SampleRow(SamplingParams(temperature=0))] * batch
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        executor.launch(step, greedy).result()
        times.append(time.perf_counter() - t0)
    med = sorted(times[1:])[len(times[1:]) // 2]
    return {"batch": batch, "length": length, "seconds_median": med, "tok_s": batch * length / med}


def measure(artifacts: list[Path], roofline_json: Path | None, json_path: Path) -> dict[str, Any]:
    """Per artifact: decode tok/s at :data:`DECODE_BATCHES` (graphs), against the roofline; prefill of
    :data:`PREFILL`; greedy tokens of the graph path against the eager torch path at batch 1 and 32."""
    import torch

    from llmc.runtime.loader import load_model
    from llmc.targets.torch.weights import PackedWeight

    bw = json.loads(roofline_json.read_text())["bandwidth_bytes_per_s"] if roofline_json and \
        roofline_json.exists() else None
    report: dict[str, Any] = {"schema": SCHEMA + "/measure", "bandwidth_bytes_per_s": bw, "artifacts": {}}
    context, steps = 128, 32
    for path in artifacts:
        entry: dict[str, Any] = {}
        model = load_model(str(path))
        ex = model.executor
        entry["executor"] = type(ex).__name__
        entry["weight_bytes"] = int(sum(w.nbytes() if isinstance(w, PackedWeight) else w.nbytes
                                        for w in ex.params.values()))
        spec = ex.kv_spec()
        kv_per_token = spec.bytes_per_block // spec.block_size
        ex.init_cache(max(DECODE_BATCHES) * -(-(context + steps + 4) // spec.block_size) + 64)
        entry["decode"] = []
        for batch in DECODE_BATCHES:
            row = _decode_steps(ex, batch, context, steps)
            # the fewest bytes a step reads: every weight once, each sequence's cached keys and values
            step_bytes = entry["weight_bytes"] + batch * (context + steps // 2) * kv_per_token
            row["roofline_tok_s"] = batch * bw / step_bytes if bw else None
            row["of_roofline"] = row["tok_s"] / row["roofline_tok_s"] if bw else None
            entry["decode"].append({k: v for k, v in row.items() if k != "tokens"})
            entry.setdefault("_tokens", {})[batch] = row["tokens"]
            print(path.name, {k: v for k, v in row.items() if k != "tokens"}, flush=True)
        ex.init_cache(PREFILL[0] * -(-PREFILL[1] // spec.block_size) + 64)
        entry["prefill"] = _prefill(ex, *PREFILL)
        print(path.name, entry["prefill"], flush=True)
        graph_tokens = entry.pop("_tokens")
        del ex, model
        torch.cuda.empty_cache()
        eager = load_model(str(path), cuda_executor="eager").executor
        eager.init_cache(32 * -(-(context + steps + 4) // spec.block_size) + 64)
        entry["eager_decode"], entry["greedy_match_eager"] = [], {}
        for batch in (1, 32):
            row = _decode_steps(eager, batch, context, steps)
            entry["greedy_match_eager"][batch] = _agreement(graph_tokens[batch], row.pop("tokens"))
            entry["eager_decode"].append(row)
            print(path.name, "eager", row, entry["greedy_match_eager"][batch], flush=True)
        del eager
        torch.cuda.empty_cache()
        report["artifacts"][path.name] = entry
        json_path.write_text(json.dumps(report, indent=1))
    return report


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Sequences whose greedy tokens are equal throughout, and the mean length of the agreeing prefix
    (bf16 near-ties may flip a token, after which the sequences diverge)."""
    same = sum(x == y for x, y in zip(a, b, strict=True))
    prefix = [next((i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q), len(x))
              for x, y in zip(a, b, strict=True)]
    return {"identical": same / len(a), "mean_agreeing_prefix": sum(prefix) / len(prefix), "length": len(a[0])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="the whole plan (the default)")
    for p in (parser, run):
        p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-out"))
        p.add_argument("--work", type=Path, default=Path("/tmp/llmc-torch-cuda"))
        p.add_argument("--budget-s", type=float, default=450.0, help="seconds for every stage together")
        p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
        p.add_argument("--python", default=sys.executable)
        p.add_argument("--dry-run", action="store_true", help="write the plan, run nothing")
    roof = sub.add_parser("roofline")
    roof.add_argument("--json", type=Path, required=True)
    meas = sub.add_parser("measure")
    meas.add_argument("--artifact", type=Path, action="append", required=True)
    meas.add_argument("--roofline", type=Path)
    meas.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "roofline":
        roofline(args.json)
        return 0
    if args.command == "measure":
        measure(args.artifact, args.roofline, args.json)
        return 0
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    plan = build_plan(args.out.resolve(), args.work.resolve(), args.budget_s, stages, args.python)
    summary = run_plan(plan, args.dry_run)
    if args.dry_run:
        for s in plan.stages:
            print(s.name, shlex.join(s.cmd))
    return 0 if all(s["status"] in ("ok", "planned") for s in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
