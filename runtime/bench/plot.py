"""Plots of bench results with matplotlib: throughput and latency against batch size / concurrency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.compiler.errors import LlmcError


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a PNG: per scenario, aggregate tok/s and TPOT/TTFT p50 against size, one line per engine.

    A scenario with a single size (``single``) is drawn as bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LlmcError("--plot needs matplotlib (pip install 'llmc-toolchain[bench]')") from exc
    rows = [r for r in report["results"] if r["error"] is None]
    scenarios = [s for s in ("single", "batch", "concurrency") if any(r["scenario"] == s for r in rows)]
    if not scenarios:
        raise LlmcError("nothing to plot: every benchmark point failed")
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 4.2 * len(scenarios)), squeeze=False)
    model = report.get("model", {}).get("name", "")
    for ax_row, scenario in zip(axes, scenarios, strict=True):
        picked = [r for r in rows if r["scenario"] == scenario]
        labels = list(dict.fromkeys(r["label"] for r in picked))
        thr, lat = ax_row
        if scenario == "single":
            decode = [next(r for r in picked if r["label"] == lb)["decode_tok_s"] or 0.0 for lb in labels]
            ttft = [1e3 * next(r for r in picked if r["label"] == lb)["ttft_s"]["p50"] for lb in labels]
            thr.bar(labels, decode, color="tab:blue")
            thr.set_ylabel("decode tok/s (batch 1)")
            lat.bar(labels, ttft, color="tab:orange")
            lat.set_ylabel("TTFT p50 (ms)")
            for ax in (thr, lat):
                ax.tick_params(axis="x", labelrotation=20)
                ax.set_title(f"{model}: single sequence")
            continue
        xlabel = "batch size" if scenario == "batch" else "concurrent requests"
        for label in labels:
            mine = sorted((r for r in picked if r["label"] == label), key=lambda r: r["size"])
            xs = [r["size"] for r in mine]
            thr.plot(xs, [r["aggregate_tok_s"] for r in mine], marker="o", label=label)
            line = lat.plot(xs, [1e3 * r["tpot_s"]["p50"] if r["tpot_s"] else None for r in mine], marker="o",
                            label=f"{label} TPOT p50")[0]
            lat.plot(xs, [1e3 * r["ttft_s"]["p50"] for r in mine], marker="x", linestyle="--",
                     color=line.get_color(), label=f"{label} TTFT p50")
        for ax in (thr, lat):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        thr.set_ylabel("aggregate output tok/s")
        thr.set_title(f"{model}: throughput ({scenario})")
        lat.set_ylabel("ms")
        lat.set_yscale("log")
        lat.set_title(f"{model}: latency ({scenario})")
    machine = report.get("machine", {})
    fig.suptitle(f"{machine.get('cpu_model', '')}, {machine.get('logical_cores')} cores; "
                 f"prompt {report['settings']['prompt_len']}, gen {report['settings']['gen_len']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
