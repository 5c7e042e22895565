"""The benchmark harness: scenarios over any :class:`Backend`, one report format for all.

Scenarios (all greedy, EOS ignored, every sequence makes exactly ``gen_len`` tokens):

- ``single``: one sequence: prefill ``prompt_len`` tokens, then decode.
- ``batch``: a static batch of B sequences prefilled in one step, then decoded in lock-step.
- ``concurrency``: C requests submitted at the same moment to the engine's request queue
  (llmc: the continuous-batching Engine with C slots; peers: their own equivalent).

Each run uses its own seeded prompts (``seed``, run index, request index), identical for every
backend, so no engine gets prefix-cache hits from an earlier run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.errors import InputError
from llmc.runtime.bench.backends import Backend, BackendInfo, BatchRun, RequestRun
from llmc.runtime.bench.machine import load_average, peak_rss_bytes
from llmc.runtime.bench.stats import mean_or_none, summarize

SCENARIOS = ("single", "batch", "concurrency")
Progress = Callable[[str], None]


@dataclass
class BenchSettings:
    """What to run; the same settings are given to every backend."""

    scenarios: tuple[str, ...] = ("single",)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    concurrency: tuple[int, ...] = (1, 5, 10, 25, 50, 100)
    prompt_len: int = 128
    gen_len: int = 128
    warmup: int = 1
    repeat: int = 3
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        self.scenarios = tuple(self.scenarios)
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        self.concurrency = tuple(int(c) for c in self.concurrency)
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise InputError(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
        if self.prompt_len < 1 or self.gen_len < 1:
            raise InputError(f"--prompt-len and --gen-len must be at least 1 (got {self.prompt_len}, {self.gen_len})")
        if self.warmup < 0 or self.repeat < 1:
            raise InputError(f"--warmup must be >= 0 and --repeat >= 1 (got {self.warmup}, {self.repeat})")
        for name, sizes in (("--batch-sizes", self.batch_sizes), ("--concurrency", self.concurrency)):
            if any(s < 1 for s in sizes):
                raise InputError(f"{name} must be positive integers, got {list(sizes)}")

    def points(self) -> list[tuple[str, int]]:
        """(scenario, size) in run order."""
        out: list[tuple[str, int]] = []
        for scenario in self.scenarios:
            if scenario == "single":
                out.append((scenario, 1))
            elif scenario == "batch":
                out += [(scenario, b) for b in self.batch_sizes]
            else:
                out += [(scenario, c) for c in self.concurrency]
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("scenarios", "batch_sizes", "concurrency"):
            data[key] = list(data[key])
        return data


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4); a clear error names the option."""
    try:
        sizes = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise InputError(f"{option} is empty")
    return sizes


def make_prompts(count: int, prompt_len: int, vocab_size: int, seed: int, run: int) -> list[list[int]]:
    """Seeded random prompts of ordinary tokens: ids drawn from ``[vocab/8, vocab/2)``, away from
    the special tokens that vocabularies keep at either end."""
    low, high = max(1, vocab_size // 8), max(2, vocab_size // 2)
    rng = np.random.default_rng([seed, run])
    return [rng.integers(low, high, prompt_len).tolist() for _ in range(count)]


def _batch_row(runs: list[BatchRun], prompt_len: int) -> dict[str, Any]:
    b = runs[0].batch_size
    steps = [s for r in runs for s in r.step_s]
    decode = [b * len(r.step_s) / sum(r.step_s) for r in runs if r.step_s]
    return {
        "prefill_tok_s": mean_or_none([b * prompt_len / r.prefill_s for r in runs]),
        "decode_tok_s": mean_or_none(decode),
        "aggregate_tok_s": mean_or_none([b * r.output_tokens / r.total_s for r in runs]),
        "ttft_s": summarize([r.prefill_s for r in runs]),
        "tpot_s": summarize(steps),
        "e2e_s": summarize([r.total_s for r in runs]),
        "output_tokens": sum(b * r.output_tokens for r in runs),
    }


def _concurrency_row(runs: list[list[RequestRun]], prompt_len: int) -> dict[str, Any]:
    prefill, decode, aggregate, tpot = [], [], [], []
    for reqs in runs:
        first_all = max(r.ttft_s for r in reqs)
        end_all = max(r.e2e_s for r in reqs)
        prefill.append(len(reqs) * prompt_len / first_all)
        later = sum(r.output_tokens - 1 for r in reqs)
        if later and end_all > first_all:
            decode.append(later / (end_all - first_all))
        aggregate.append(sum(r.output_tokens for r in reqs) / end_all)
        tpot += [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in reqs if r.output_tokens > 1]
    return {
        "prefill_tok_s": mean_or_none(prefill),
        "decode_tok_s": mean_or_none(decode),
        "aggregate_tok_s": mean_or_none(aggregate),
        "ttft_s": summarize([r.ttft_s for reqs in runs for r in reqs]),
        "tpot_s": summarize(tpot),
        "e2e_s": summarize([r.e2e_s for reqs in runs for r in reqs]),
        "output_tokens": sum(r.output_tokens for reqs in runs for r in reqs),
    }


def roofline(info: BackendInfo, batch: int, decode_tok_s: float | None, bandwidth: float | None) -> dict[str, Any]:
    """Decode throughput against the memory-bandwidth limit of reading the weights once per step.

    One decode step of ``batch`` sequences reads every weight once (and one embedding row per
    sequence), so the limit is ``batch * bandwidth / bytes_per_step`` tokens/s; KV-cache reads
    are left out (they are small next to the weights at these context lengths)."""
    per_step = info.weight_bytes_per_step + (batch - 1) * info.embed_row_bytes
    limit = batch * bandwidth / per_step if bandwidth and per_step else None
    pct = 100.0 * decode_tok_s / limit if limit and decode_tok_s is not None else None
    return {"weight_bytes_per_step": per_step, "limit_tok_s": limit, "pct": pct}


def run_point(backend: Backend, info: BackendInfo, scenario: str, size: int, settings: BenchSettings,
              vocab_size: int, bandwidth: float | None, progress: Progress | None = None) -> dict[str, Any]:
    """Warm up, then time ``repeat`` runs of one (scenario, size); a failure becomes ``error``."""
    row: dict[str, Any] = {
        "engine": info.engine, "label": info.label, "scenario": scenario, "size": size,
        "prompt_len": settings.prompt_len, "gen_len": settings.gen_len, "repeats": settings.repeat,
        "prefill_tok_s": None, "decode_tok_s": None, "aggregate_tok_s": None, "ttft_s": None, "tpot_s": None,
        "e2e_s": None, "output_tokens": 0, "roofline": None, "peak_rss_bytes": None, "gpu_peak_bytes": None,
        "load_average": None, "wall_s": 0.0, "error": None,
    }
    start = time.perf_counter()
    try:
        runs: list[Any] = []
        for i in range(settings.warmup + settings.repeat):
            prompts = make_prompts(size, settings.prompt_len, vocab_size, settings.seed, i)
            if scenario == "concurrency":
                result: Any = backend.run_concurrent(prompts, settings.gen_len)
            else:
                result = backend.run_batch(prompts, settings.gen_len)
            if i >= settings.warmup:
                runs.append(result)
            if progress is not None:
                progress(f"{info.label} {scenario} {size}")
        if scenario == "concurrency":
            row.update(_concurrency_row(runs, settings.prompt_len))
        else:
            row.update(_batch_row(runs, settings.prompt_len))
        row["roofline"] = roofline(info, size, row["decode_tok_s"], bandwidth)
    except Exception as exc:  # one failing point must not lose the others
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["wall_s"] = time.perf_counter() - start
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["gpu_peak_bytes"] = backend.gpu_peak_bytes()
    row["load_average"] = load_average()
    return row


def run_backend(backend: Backend, settings: BenchSettings, vocab_size: int, bandwidth: float | None,
                progress: Progress | None = None, points: Sequence[tuple[str, int]] | None = None,
                ) -> tuple[BackendInfo, list[dict[str, Any]]]:
    """Every point of ``settings`` on ``backend``."""
    info = backend.info()
    rows = [run_point(backend, info, scenario, size, settings, vocab_size, bandwidth, progress)
            for scenario, size in (points or settings.points())]
    return info, rows


@dataclass
class Report:
    """The JSON document ``llmc bench`` writes (see docs/bench_schema.md)."""

    machine: dict[str, Any]
    software: dict[str, Any]
    bandwidth: dict[str, Any] | None
    settings: dict[str, Any]
    model: dict[str, Any]
    backends: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        import datetime as _dt

        from llmc.runtime.bench.schema import SCHEMA_NAME, SCHEMA_VERSION

        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "machine": self.machine,
            "software": self.software,
            "bandwidth": self.bandwidth,
            "settings": self.settings,
            "model": self.model,
            "backends": self.backends,
            "results": self.results,
            "notes": self.notes,
        }
