"""What ``llmc passes`` shows: every registered pass and every named pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmc.passes.pipelines import PASSES, PIPELINE_DOCS, PIPELINES, _load_builtin_passes, pipeline_for


def describe_passes(target: str | None = None, fused_ops: frozenset[str] = frozenset(),
                    preferred: Callable[[int], list[str] | None] | None = None,
                    rewrites: Callable[[int], list[str]] | None = None) -> dict[str, Any]:
    """Passes (name, doc, fused ops produced) and pipelines; with a ``target`` name, also the pass
    list each level runs for it: ``preferred(level)`` is its own list (None: the generic one), and
    passes producing fused ops outside ``fused_ops`` are dropped; ``rewrites(level)`` are the
    target's own rewrites, run after that list (``Target.rewrites``)."""
    _load_builtin_passes()
    passes = [
        {"name": name, "doc": factory.doc, "produces": sorted(getattr(factory, "produces", ()))}
        for name, factory in sorted(PASSES.items())
    ]
    pipelines = [{"name": key, "doc": PIPELINE_DOCS.get(key, ""), "passes": list(names)}
                 for key, names in PIPELINES.items()]
    data: dict[str, Any] = {"passes": passes, "pipelines": pipelines}
    if target is not None:
        data["target"] = {
            "name": target,
            "fused_ops": sorted(fused_ops),
            "pipelines": {
                key: [p.describe() for p in pipeline_for(int(key[1:]), fused_ops,
                                                         preferred(int(key[1:])) if preferred else None)]
                for key in PIPELINES
            },
            "rewrites": {key: list(rewrites(int(key[1:])) if rewrites else []) for key in PIPELINES},
        }
    return data


def format_passes(data: dict[str, Any]) -> str:
    width = max(len(p["name"]) for p in data["passes"])
    lines = ["passes:"]
    for p in data["passes"]:
        produces = f"  [produces {', '.join(p['produces'])}]" if p["produces"] else ""
        lines.append(f"  {p['name']:<{width}}  {p['doc']}{produces}")
    lines.append("pipelines:")
    for pl in data["pipelines"]:
        lines.append(f"  {pl['name']}  {pl['doc']}")
        lines.append(f"      {', '.join(pl['passes']) or '(no passes)'}")
    if "target" in data:
        t = data["target"]
        lines.append(f"for target {t['name']} (lowers {', '.join(t['fused_ops']) or 'no fused ops'}):")
        for key, names in t["pipelines"].items():
            extra = t.get("rewrites", {}).get(key)
            lines.append(f"  {key}  {', '.join(names) or '(no passes)'}"
                         + (f"; then the target's rewrites: {', '.join(extra)}" if extra else ""))
    return "\n".join(lines)
