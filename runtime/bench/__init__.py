"""``llmc bench``: decode/prefill throughput, TTFT, TPOT, latency, memory and a roofline.

    from llmc.runtime.bench import BenchSettings, run_bench
    report = run_bench("out/model", BenchSettings(scenarios=("single", "batch"), batch_sizes=(1, 8)))

The report is a JSON document (schema: :mod:`llmc.runtime.bench.schema`, docs/bench_schema.md);
``benchmarks/peers.py`` produces the same document for llama.cpp, transformers and ONNX Runtime
GenAI beside llmc, so one table and one plot hold them all.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import install_hint
from llmc.runtime.artifact import Artifact
from llmc.runtime.bench.backends import Backend, BackendInfo, BatchRun, LlmcBackend, RequestRun
from llmc.runtime.bench.harness import SCENARIOS, BenchSettings, Report, make_prompts, parse_sizes, run_backend
from llmc.runtime.bench.machine import machine_info, measure_bandwidth, software_info
from llmc.runtime.bench.plot import plot_report
from llmc.runtime.bench.schema import validate
from llmc.runtime.bench.table import markdown_table

__all__ = [
    "SCENARIOS", "Backend", "BackendInfo", "BatchRun", "BenchSettings", "LlmcBackend", "Report", "RequestRun",
    "check_dependencies", "make_prompts", "markdown_table", "model_summary", "new_report", "parse_sizes",
    "plot_report", "progress_bar", "run_bench", "validate", "write_outputs",
]


def missing_dependencies(plot: bool = False, quiet: bool = False) -> list[str]:
    """The modules of the ``bench`` extra a run needs and this Python lacks: jsonschema (the report is
    validated), tqdm (the progress bar, unless ``quiet``), matplotlib (with ``plot``)."""
    wanted = ["jsonschema"] + ([] if quiet else ["tqdm"]) + (["matplotlib"] if plot else [])
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def check_dependencies(plot: bool = False, quiet: bool = False) -> None:
    """Raise a clear error, before anything runs, when the ``bench`` extra is missing."""
    missing = missing_dependencies(plot, quiet)
    if missing:
        raise LlmcError(f"llmc bench needs {', '.join(missing)} (the bench extra)", hint=install_hint("bench"))


def progress_bar(total: int, quiet: bool = False) -> tuple[Callable[[str], None], Callable[[], None]]:
    """(advance(description), close()) of a tqdm bar on stderr (no-ops when ``quiet``)."""
    if quiet:
        return (lambda _desc: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def advance(desc: str) -> None:
        bar.set_description(desc)
        bar.update(1)

    return advance, bar.close


def new_report(settings: BenchSettings, model: dict[str, Any], threads: int | None, measure_bw: bool = True,
               command: list[str] | None = None, bandwidth_mib: int = 256, device: str | None = None) -> Report:
    """A report with machine/software info and (once per run) the measured memory bandwidth
    (of the GPU's memory when ``device`` is a CUDA device)."""
    bandwidth = measure_bandwidth(threads or 1, mib=bandwidth_mib, device=device) if measure_bw else None
    return Report(machine=machine_info(), software=software_info(), bandwidth=bandwidth,
                  settings=settings.to_dict(), model=model, command=list(command if command is not None else sys.argv))


def model_summary(artifact: Artifact) -> dict[str, Any]:
    """Name (the source's file or folder name) and shapes of an artifact's model."""
    c = artifact.config
    source = str(artifact.manifest.get("source", {}).get("path", artifact.path))
    return {"name": Path(source).name or str(artifact.path), "vocab_size": c.vocab_size, "num_layers": c.num_layers,
            "hidden_size": c.hidden_size, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "intermediate_size": c.intermediate_size, "params": c.param_count}


def run_bench(artifact: str | Path, settings: BenchSettings, device: str | None = None, quiet: bool = False,
              engine_config: dict[str, Any] | None = None, measure_bw: bool = True,
              bandwidth_mib: int = 256, name: str | None = None) -> dict[str, Any]:
    """Benchmark a compiled artifact; returns the report dict (already validated). ``name``: what
    tables and plots call it after ``llmc/TARGET:`` (default: the artifact's folder name)."""
    check_dependencies(quiet=quiet)
    backend = LlmcBackend(artifact, threads=settings.threads, device=device, engine_config=engine_config,
                          name=name)
    try:
        report = new_report(settings, model_summary(backend.artifact), settings.threads, measure_bw,
                            bandwidth_mib=bandwidth_mib, device=str(backend.executor.device))
        points = settings.points()
        advance, close = progress_bar(len(points) * (settings.warmup + settings.repeat), quiet)
        try:
            bw = report.bandwidth["bytes_per_s"] if report.bandwidth else None
            info, rows = run_backend(backend, settings, backend.artifact.config.vocab_size, bw, advance)
        finally:
            close()
    finally:
        backend.close()
    report.backends.append(info.to_dict())
    report.results.extend(rows)
    data = report.to_dict()
    validate(data)
    return data


def write_outputs(report: dict[str, Any], json_out: str | Path | None, plot_out: str | Path | None) -> None:
    """Write the JSON report and/or the plot."""
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")
    if plot_out is not None:
        plot_report(report, plot_out)
