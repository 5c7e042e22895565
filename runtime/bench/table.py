"""Markdown tables of bench results (one row per engine and point)."""

from __future__ import annotations

from typing import Any


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def _ms(summary: dict[str, float] | None, key: str) -> str:
    return "—" if summary is None else f"{1e3 * summary[key]:.1f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The results as a GitHub markdown table (errors in the last column)."""
    header = ("| engine | scenario | size | prefill tok/s | decode tok/s | aggregate tok/s | TTFT p50 / p95 ms "
              "| TPOT p50 / p95 ms | e2e p50 s | roofline % | peak RSS MiB | note |")
    lines = [header, "|" + "---|" * 12]
    for r in results:
        roof = r.get("roofline") or {}
        rss = r.get("peak_rss_bytes")
        lines.append(
            f"| {r['label']} | {r['scenario']} | {r['size']} | {_num(r['prefill_tok_s'])} "
            f"| {_num(r['decode_tok_s'])} | {_num(r['aggregate_tok_s'])} "
            f"| {_ms(r['ttft_s'], 'p50')} / {_ms(r['ttft_s'], 'p95')} "
            f"| {_ms(r['tpot_s'], 'p50')} / {_ms(r['tpot_s'], 'p95')} "
            f"| {_num(r['e2e_s']['p50'] if r['e2e_s'] else None, '{:.2f}')} "
            f"| {_num(roof.get('pct'))} | {_num(rss / 2**20 if rss else None, '{:.0f}')} "
            f"| {r['error'] or ''} |"
        )
    return "\n".join(lines)
