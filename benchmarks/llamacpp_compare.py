#!/usr/bin/env python
"""llmc's default CPU build of a GGUF beside llama.cpp's own tools, interleaved, in one command.

    python benchmarks/llamacpp_compare.py --gguf model.gguf --threads 2 --rounds 3 \\
        --json out.json --plot out.png --markdown out.md

llmc: ``llmc compile model.gguf`` with the default options (``--artifact`` to give another
artifact), its executor driven directly (no HTTP, as llama.cpp's tools run). llama.cpp: its own
tools from ``--llama-bin`` (``../shared/tools/build_llamacpp.sh`` builds them), each in its own
process. Every round runs every measurement once on each side, alternating which goes first;
the figures are medians over the rounds:

* prefill of 1 x P tokens (``--prompt-lens``): llmc's first step on a P-token prompt against
  ``llama-bench -p P -n 0``;
* batch-1 decode: llmc's decode steps after a 64-token prompt against ``llama-bench -p 0 -n G``
  (and after a P-token prompt against ``llama-bench -d P -n G``);
* 32 sequences (``--batch``): one static batch of B x 64-token prompts then G decode steps
  against ``llama-batched-bench -npp 64 -ntg G -npl B`` (its S_PP and S_TG);
* perplexity (once, not timed) scored as ``llama-perplexity`` scores it: the text's tokens in
  windows of ``--ppl-ctx`` tokens (BOS first when the model adds one), each window's second half
  predicted from its first, against ``llama-perplexity -c CTX`` on the same text.

The report follows the bench JSON schema (docs/bench_schema.md): one result per engine and point,
the ratios and perplexities in ``notes``; ``--plot`` draws it, ``--markdown`` writes the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.runtime.bench import (
    BackendInfo,
    BenchSettings,
    LlmcBackend,
    make_prompts,
    markdown_table,
    new_report,
    validate,
)
from llmc.runtime.bench.machine import load_average, peak_rss_bytes
from llmc.runtime.bench.stats import summarize

DEFAULT_BIN = Path.home() / ".cache" / "llmc" / "llama.cpp" / "bin"
GOALS = {"prefill": 1.5, "decode_b1": 1.2, "decode_batch": 3.0}


# -- llama.cpp's tools ---------------------------------------------------------------------------
def run_tool(bin_dir: Path, tool: str, args: list[str], timeout: float = 1800) -> str:
    env = {**os.environ, "LD_LIBRARY_PATH": f"{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    done = subprocess.run([str(bin_dir / tool), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout + "\n" + done.stderr


def llama_bench(bin_dir: Path, gguf: str, threads: int, prompt: int, gen: int, depth: int = 0) -> float:
    """tokens/s of one ``llama-bench`` test (``-p prompt -n gen -d depth``, one repetition)."""
    out = run_tool(bin_dir, "llama-bench", ["-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                                            "-d", str(depth), "-r", "1", "-o", "json"])
    records = json.loads(out[out.index("["): out.rindex("]") + 1])
    (record,) = [r for r in records if r["n_prompt"] == prompt and r["n_gen"] == gen]
    return float(record["avg_ts"])


def llama_batched_bench(bin_dir: Path, gguf: str, threads: int, batch: int, prompt: int, gen: int
                        ) -> tuple[float, float]:
    """(S_PP, S_TG) tokens/s of ``llama-batched-bench -npp prompt -ntg gen -npl batch``."""
    ctx = batch * (prompt + gen) + 64
    out = run_tool(bin_dir, "llama-batched-bench", ["-m", gguf, "-t", str(threads), "-c", str(ctx), "-npp",
                                                    str(prompt), "-ntg", str(gen), "-npl", str(batch)])
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] == str(prompt) and cells[2] == str(batch):
            return float(cells[5]), float(cells[7])
    raise RuntimeError(f"no result row in llama-batched-bench's output:\n{out[-2000:]}")


def llama_perplexity(bin_dir: Path, gguf: str, threads: int, text: Path, ctx: int, chunks: int
                     ) -> tuple[float, int]:
    """(perplexity, chunks) of ``llama-perplexity -c ctx --chunks chunks`` on ``text``."""
    out = run_tool(bin_dir, "llama-perplexity", ["-m", gguf, "-t", str(threads), "-f", str(text), "-c", str(ctx),
                                                 "--chunks", str(chunks)], timeout=7200)
    ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    n = re.search(r"calculating perplexity over (\d+) chunks", out)
    if ppl is None or n is None:
        raise RuntimeError(f"no perplexity in llama-perplexity's output:\n{out[-2000:]}")
    return float(ppl.group(1)), int(n.group(1))


# -- llmc -----------------------------------------------------------------------------------------
def llmc_prefill(backend: LlmcBackend, prompt: list[int]) -> float:
    """tokens/s of one prefill step of ``prompt``."""
    run = backend.run_batch([prompt], 1)
    return len(prompt) / run.prefill_s


def llmc_decode(backend: LlmcBackend, prompts: list[list[int]], gen: int) -> tuple[float, float, list[float]]:
    """(prefill tok/s, decode tok/s over the decode steps, step times) of one static batch."""
    run = backend.run_batch(prompts, gen)
    b = len(prompts)
    return b * len(prompts[0]) / run.prefill_s, b * len(run.step_s) / sum(run.step_s), run.step_s


def llmc_perplexity(backend: LlmcBackend, tokens: list[int], ctx: int, chunks: int, bos: int | None) -> float:
    """Perplexity as ``llama-perplexity`` computes it: windows of ``ctx`` tokens (the first replaced
    by BOS when the model adds one), logits of positions ``ctx/2 .. ctx-2`` predicting the next token."""
    from llmc.compiler.ir.batch import BatchLayout
    from llmc.runtime.evaluate import log_softmax
    from llmc.runtime.executor import StepBatch

    executor = backend.executor
    backend.close()
    tables = backend._tables(1, ctx)
    first = ctx // 2
    nll, count = 0.0, 0
    for c in range(chunks):
        window = list(tokens[c * ctx:(c + 1) * ctx])
        if bos is not None:
            window[0] = bos
        layout = BatchLayout((0,), (ctx,), (ctx,))
        rows = np.arange(first, ctx - 1)
        logits = executor.step(StepBatch(np.asarray(window, dtype=np.int64), layout, tables, rows))
        logp = log_softmax(logits)
        targets = np.asarray(window[first + 1:ctx])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(nll / count)


def default_text() -> str:
    """A held-out English text every Python has: the first 120k characters of pydoc's help topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:120_000]


# -- the report -----------------------------------------------------------------------------------
def row(info: BackendInfo, scenario: str, size: int, prompt: int, gen: int, prefill: list[float],
        decode: list[float], steps: list[float] | None = None) -> dict[str, Any]:
    med = lambda xs: statistics.median(xs) if xs else None
    p, d = med(prefill), med(decode)
    return {
        "engine": info.engine, "label": info.label, "scenario": scenario, "size": size, "prompt_len": prompt,
        "gen_len": gen, "repeats": max(len(prefill), len(decode)), "prefill_tok_s": p, "decode_tok_s": d,
        "aggregate_tok_s": None,
        "ttft_s": summarize([size * prompt / x for x in prefill]) if prefill else None,
        "tpot_s": summarize(steps) if steps else (summarize([size / x for x in decode]) if decode else None),
        "e2e_s": None, "output_tokens": size * gen * max(len(decode), 1) if decode else 0, "roofline": None,
        "peak_rss_bytes": peak_rss_bytes() if info.engine == "llmc" else None, "gpu_peak_bytes": None,
        "load_average": load_average(), "wall_s": 0.0, "error": None,
    }


def llamacpp_info(gguf: str, threads: int, bin_dir: Path) -> BackendInfo:
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(gguf)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return BackendInfo("llama.cpp", "llama.cpp (its own tools)", None, sum(sizes.values()), sum(sizes.values()), 0,
                       threads, "cpu", {"gguf": gguf, "tensor_types": types, "tools": str(bin_dir)})


def ratio_table(ratios: list[tuple[str, float | None, float | None, float | None, float | None]]) -> str:
    lines = ["| measurement | llmc | llama.cpp | llmc / llama.cpp | goal | met |", "|---|---:|---:|---:|---:|---|"]
    for name, ours, theirs, ratio, goal in ratios:
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if v < 100 else f"{v:.0f}")
        met = "-" if goal is None or ratio is None else ("yes" if ratio >= goal else "**no**")
        lines.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{'-' if goal is None else f'>= {goal}x'} | {met} |")
    return "\n".join(lines)


def plot_ratios(ratios: list[tuple[str, float | None, float | None, float | None, float | None]], title: str,
                path: str) -> None:
    """One bar pair per speed measurement (llmc, llama.cpp; tokens/s), the ratio and the goal above it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in ratios if r[1] is not None and r[2] is not None and "perplexity" not in r[0]]
    fig, ax = plt.subplots(figsize=(11, 5))
    xs = np.arange(len(speed))
    ax.bar(xs - 0.2, [r[1] for r in speed], 0.4, label="llmc (default compile of the GGUF)")
    ax.bar(xs + 0.2, [r[2] for r in speed], 0.4, label="llama.cpp (llama-bench, llama-batched-bench)")
    for x, (_, ours, theirs, ratio, goal) in zip(xs, speed, strict=True):
        text = f"{ratio:.2f}x" + (f"\n(goal {goal}x)" if goal else "")
        ax.text(x, max(ours, theirs) * 1.05, text, ha="center", va="bottom", fontsize=9)
    ax.set_xticks(xs, [r[0].replace(" tok/s", "").replace(": ", ":\n") for r in speed], fontsize=8)
    ax.set_ylabel("tokens / s (median of the rounds)")
    ax.set_ylim(0, max(max(r[1], r[2]) for r in speed) * 1.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="The GGUF both sides run.")
    parser.add_argument("--artifact", help="llmc artifact to run (default: `llmc compile GGUF` into --work).")
    parser.add_argument("--work", default=None, help="Folder for the compiled artifact and the text file.")
    parser.add_argument("--llama-bin", default=str(DEFAULT_BIN), help="Folder of llama.cpp's tools.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-lens", default="64,512")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ppl-file", default=None, help="Held-out text (default: pydoc's help topics).")
    parser.add_argument("--ppl-ctx", type=int, default=512)
    parser.add_argument("--ppl-chunks", type=int, default=40)
    parser.add_argument("--no-ppl", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    bin_dir = Path(args.llama_bin)
    gguf = str(Path(args.gguf).resolve())
    work = Path(args.work or tempfile.mkdtemp(prefix="llmc-vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    prompt_lens = [int(x) for x in args.prompt_lens.split(",")]
    threads, gen, batch = args.threads, args.gen_len, args.batch

    artifact = Path(args.artifact) if args.artifact else work / "llmc-default"
    if not args.artifact:
        from llmc.driver import compile_model

        t0 = time.perf_counter()
        compile_model(gguf, artifact)
        print(f"compiled {gguf} with the default options in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    backend = LlmcBackend(artifact, threads=threads, name="default")
    ours = backend.info()
    ours.details["native_step"] = getattr(backend.executor, "native", None) is not None
    from llmc.targets.torch import qkernels

    ours.details["kernel_path"] = qkernels.current_isa() if qkernels.available() else None  # LLMC_CPU_ISA
    ours.details["kv_cache_dtype"] = str(getattr(backend.executor, "kv_dtype", "")).removeprefix("torch.")
    theirs = llamacpp_info(gguf, threads, bin_dir)
    vocab = backend.executor.config.vocab_size
    settings = BenchSettings(scenarios=("single", "batch"), batch_sizes=(batch,), prompt_len=64, gen_len=gen,
                             warmup=1, repeat=args.rounds, threads=threads)
    from llmc.runtime.bench import model_summary

    report = new_report(settings, model_summary(backend.artifact), threads, command=[sys.executable, *sys.argv])
    samples: dict[tuple[str, str], list[float]] = {}
    steps: dict[str, list[float]] = {}
    add = lambda key, value: samples.setdefault(key, []).append(value)

    def run_llmc(r: int) -> None:
        for p in prompt_lens:
            add(("llmc", f"prefill{p}"), llmc_prefill(backend, make_prompts(1, p, vocab, 0, r)[0]))
            _, dec, st = llmc_decode(backend, make_prompts(1, p, vocab, 1, r), gen)
            add(("llmc", f"decode_b1_d{p}"), dec)
            steps.setdefault(f"b1_d{p}", []).extend(st)
        pre, dec, st = llmc_decode(backend, make_prompts(batch, 64, vocab, 2, r), gen)
        add(("llmc", "batch_prefill"), pre)
        add(("llmc", "batch_decode"), dec)
        steps.setdefault("batch", []).extend(st)

    def run_llamacpp(r: int) -> None:
        for p in prompt_lens:
            add(("llama.cpp", f"prefill{p}"), llama_bench(bin_dir, gguf, threads, p, 0))
            add(("llama.cpp", f"decode_b1_d{p}"), llama_bench(bin_dir, gguf, threads, 0, gen, depth=p))
        pre, dec = llama_batched_bench(bin_dir, gguf, threads, batch, 64, gen)
        add(("llama.cpp", "batch_prefill"), pre)
        add(("llama.cpp", "batch_decode"), dec)

    run_llmc(999)  # warm-up (first-step allocations); llama.cpp's tools warm up themselves
    for r in range(args.rounds):
        for side in ((run_llmc, run_llamacpp) if r % 2 == 0 else (run_llamacpp, run_llmc)):
            side(r)
        print(f"round {r + 1}/{args.rounds} done (load {load_average()})", file=sys.stderr)

    med = lambda key: statistics.median(samples[key]) if samples.get(key) else None
    results = []
    for engine, info in (("llmc", ours), ("llama.cpp", theirs)):
        for p in prompt_lens:
            own_steps = steps.get(f"b1_d{p}") if engine == "llmc" else None
            results.append(row(info, "single", 1, p, gen, samples[(engine, f"prefill{p}")],
                               samples[(engine, f"decode_b1_d{p}")], own_steps))
        results.append(row(info, "batch", batch, 64, gen, samples[(engine, "batch_prefill")],
                           samples[(engine, "batch_decode")], steps.get("batch") if engine == "llmc" else None))
    ratios: list[tuple[str, float | None, float | None, float | None, float | None]] = []
    for p in prompt_lens:
        a, b = med(("llmc", f"prefill{p}")), med(("llama.cpp", f"prefill{p}"))
        ratios.append((f"prefill 1 x {p} tok/s", a, b, a / b if a and b else None, GOALS["prefill"]))
    for p in prompt_lens:
        a, b = med(("llmc", f"decode_b1_d{p}")), med(("llama.cpp", f"decode_b1_d{p}"))
        ratios.append((f"batch-1 decode tok/s after {p} tokens", a, b, a / b if a and b else None,
                       GOALS["decode_b1"]))
    a, b = med(("llmc", "batch_prefill")), med(("llama.cpp", "batch_prefill"))
    ratios.append((f"{batch} sequences: prefill tok/s ({batch} x 64)", a, b, a / b if a and b else None, None))
    a, b = med(("llmc", "batch_decode")), med(("llama.cpp", "batch_decode"))
    ratios.append((f"{batch} sequences: decode tok/s", a, b, a / b if a and b else None, GOALS["decode_batch"]))
    notes = [f"samples per point: {args.rounds} interleaved rounds (medians); llmc's executor driven directly, "
             f"llama.cpp's tools as subprocesses; threads {threads}",
             f"llmc native step program: {ours.details['native_step']}, CPU kernel path "
             f"{ours.details['kernel_path']}, KV cache {ours.details['kv_cache_dtype']}"]
    if not args.no_ppl:
        text = Path(args.ppl_file) if args.ppl_file else work / "heldout.txt"
        if not args.ppl_file:
            text.write_text(default_text())
        tokenizer = backend.model.tokenizer
        assert tokenizer is not None
        tokens = tokenizer.encode(text.read_text(), add_special_tokens=True)
        bos = backend.executor.config.bos_token_id if tokens and tokens[0] == backend.executor.config.bos_token_id \
            else None
        chunks = min(args.ppl_chunks, len(tokens) // args.ppl_ctx)
        ppl_theirs, their_chunks = llama_perplexity(bin_dir, gguf, threads, text, args.ppl_ctx, chunks)
        ppl_ours = llmc_perplexity(backend, tokens, args.ppl_ctx, chunks, bos)
        ours.details["perplexity"] = ppl_ours
        theirs.details["perplexity"] = ppl_theirs
        ratios.append((f"perplexity ({chunks} x {args.ppl_ctx} tokens, {text.name})", ppl_ours, ppl_theirs,
                       ppl_ours / ppl_theirs, None))
        notes.append(f"perplexity on {text} ({len(tokens)} tokens; {chunks} windows of {args.ppl_ctx}, llama.cpp "
                     f"scored {their_chunks}): llmc {ppl_ours:.4f}, llama.cpp {ppl_theirs:.4f} "
                     f"({(ppl_ours / ppl_theirs - 1) * 100:+.2f}%; goal: within 1%)")
    for name, a, b, ratio, goal in ratios:
        if ratio is not None:
            notes.append(f"{name}: llmc {a:.4g}, llama.cpp {b:.4g}, ratio {ratio:.3f}"
                         + (f" (goal >= {goal}: {'met' if ratio >= goal else 'not met'})" if goal else ""))
    report.backends = [ours.to_dict(), theirs.to_dict()]
    report.results = results
    report.notes = notes
    data = report.to_dict()
    validate(data)
    table = ratio_table(ratios)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n\n" + markdown_table(results) + "\n")
    if args.plot:
        machine = data["machine"]
        plot_ratios(ratios, f"{Path(gguf).name} on {machine['cpu_model']} ({machine['logical_cores']} cores), "
                            f"{threads} threads, {args.rounds} interleaved rounds", args.plot)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
