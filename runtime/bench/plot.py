"""Plots of bench results with matplotlib: throughput and latency against batch size / concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import install_hint

ROWS = (
    ("aggregate_tok_s", "output tok/s (all sequences)", 1.0),
    ("tpot_s", "time per output token p50 (ms)", 1e3),
    ("ttft_s", "time to first token p50 (ms)", 1e3),
)
"""(result key, y label, scale) of each row of panels; summaries plot their p50."""

AXES = {"batch": "batch size", "concurrency": "concurrent requests"}


def _value(row: dict[str, Any], key: str, scale: float) -> float | None:
    value = row.get(key)
    if isinstance(value, dict):
        value = value.get("p50")
    return None if value is None else float(value) * scale


def plot_series(report: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Results by x axis (``batch``, ``concurrency``) and engine label, sorted by size. A ``single``
    run is batch size 1 (the same measurement), used where the batch sweep has no size 1."""
    rows = [r for r in report["results"] if r["error"] is None]
    series: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for axis in AXES:
        for r in rows:
            if r["scenario"] == axis:
                series.setdefault(axis, {}).setdefault(r["label"], []).append(r)
    for r in rows:
        if r["scenario"] == "single":
            lines = series.setdefault("batch", {}).setdefault(r["label"], [])
            if not any(p["size"] == 1 for p in lines):
                lines.append(r)
    for lines in series.values():
        for points in lines.values():
            points.sort(key=lambda p: p["size"])
    return series


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: one column per x axis (batch size, concurrent requests), rows for throughput,
    time per output token and time to first token, one line per engine, the measured sizes as ticks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError as exc:
        raise LlmcError("--plot needs matplotlib", hint=install_hint("bench")) from exc
    series = plot_series(report)
    if not series:
        raise LlmcError("nothing to plot: every benchmark point failed")
    axes_names = [a for a in AXES if a in series]
    labels = list(dict.fromkeys(label for a in axes_names for label in series[a]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, grid = plt.subplots(len(ROWS), len(axes_names), figsize=(6.2 * len(axes_names), 3.3 * len(ROWS)),
                             squeeze=False, sharex="col")
    model = report.get("model", {}).get("name", "")
    for col, axis in enumerate(axes_names):
        sizes = sorted({p["size"] for points in series[axis].values() for p in points})
        lonely = len(sizes) == 1
        for row, (key, ylabel, scale) in enumerate(ROWS):
            ax = grid[row][col]
            for label, points in series[axis].items():
                xs = [p["size"] for p in points]
                ys = [_value(p, key, scale) for p in points]
                ax.plot(xs, ys, marker="o", color=colors[label], label=label)
                if lonely:  # one point per engine: say its value
                    for x, y in zip(xs, ys, strict=True):
                        if y is not None:
                            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)  # linear from zero: differences read as they are
            if len(sizes) > 1 and sizes[-1] / sizes[0] >= 8:
                ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(s) for s in sizes])
            if row == 0:
                title = f"{model}: {AXES[axis]}" + (" (one point: run --scenario batch for a curve)" if lonely else "")
                ax.set_title(title, fontsize=10)
                ax.legend(fontsize=8)
        grid[-1][col].set_xlabel(AXES[axis])
    machine, settings = report.get("machine", {}), report["settings"]
    fig.suptitle(f"{machine.get('cpu_model', '')}, {machine.get('logical_cores')} cores; prompt "
                 f"{settings['prompt_len']} tokens, {settings['gen_len']} generated", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
