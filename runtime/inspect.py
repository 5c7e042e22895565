"""Human and JSON summaries of an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmc.runtime.artifact import IR_FILE, Artifact


def weight_types(params: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many of a manifest's ``params`` have each quant scheme (or dtype, when not quantized)."""
    types: dict[str, int] = {}
    for record in params.values():
        key = record.get("quant") or record.get("dtype", "?")
        types[key] = types.get(key, 0) + 1
    return types


def summarize(path: Path, memory_bytes: int = 8 << 30, lengths: list[int] | None = None,
              ) -> tuple[dict[str, Any], str]:
    """A summary dict (with a ``text`` rendering) and the IR text; its capacity report is for
    ``memory_bytes`` of device memory and sequences of ``lengths`` tokens (default: 512, 2048, 8192
    and the context, those within it)."""
    from llmc.runtime.capacity import artifact_capacity, default_lengths

    artifact = Artifact.load(path)
    m = artifact.manifest
    counts = artifact.module.op_counts()
    weight_bytes = sum(int(r.get("bytes", 0)) for r in m["params"].values())
    quant = weight_types(m["params"])
    summary: dict[str, Any] = {
        "path": str(path),
        "schema_version": m["schema_version"],
        "llmc_version": m["llmc_version"],
        "source": m["source"],
        "target": m["target"],
        "model": m["model"],
        "pipeline": m["pipeline"],
        "op_counts": counts,
        "param_count": len(m["params"]),
        "weight_bytes": weight_bytes,
        "weight_types": quant,
        "quality": m.get("quality"),
    }
    lines = [
        f"artifact     {path}",
        f"llmc         {m['llmc_version']} (schema {m['schema_version']})",
        f"source       {m['source']['kind']} {m['source']['path']}",
        f"target       {m['target']['name']} {m['target'].get('options', {})}",
        f"model        {m['model']['num_layers']} layers, hidden {m['model']['hidden_size']}, "
        f"heads {m['model']['num_heads']}/{m['model']['num_kv_heads']}, vocab {m['model']['vocab_size']}",
        f"weights      {len(m['params'])} params, {weight_bytes / 2**20:.2f} MiB, types {quant}",
        f"pipeline     O{m['pipeline']['opt_level']}"
        + (f" custom {m['pipeline']['custom']!r}" if m["pipeline"].get("custom") else ""),
    ]
    for record in m["pipeline"]["passes"]:
        lines.append(f"  {record['name']:<28} changed={record['changed']!s:<5} {record['seconds'] * 1e3:8.2f} ms "
                     f"{record['stats']}")
        for reason, count in record.get("rejections", {}).items():
            lines.append(f"  {'':<28} rejected {count}x: {reason}")
    summary["quantization"] = m.get("quantization")
    if m.get("quantization"):
        qz = m["quantization"]
        cal = qz.get("calibration")
        lines.append(f"quant        {qz['mode']}" + (f" plan {qz['plan']}" if qz.get("plan") else "")
                     + (f", {cal['method']} calibration on {cal['tokens']} tokens" if cal else "")
                     + (f", escalated {qz['escalated']}" if qz.get("escalated") else ""))
    if m.get("quality"):
        q = m["quality"]
        got, ref = q["quantized"], q["reference"]
        budget = q.get("max_ppl_increase")
        lines.append(f"quality      ppl {got['perplexity']:.4f} vs {ref['perplexity']:.4f} (+{q['ppl_increase']:.2%}"
                     + (f", budget {budget:.2%}" if budget is not None else "") + f"), KL {got['kl_mean']:.4g}, "
                     f"top-1 {got['top1_agreement']:.1%} on {q['tokens']} tokens of {q['eval_file']}")
    for fn_name, fn_counts in counts.items():
        lines.append(f"ops {fn_name:<8} " + ", ".join(f"{op}={n}" for op, n in fn_counts.items()))
    capacity = artifact_capacity(artifact, memory_bytes)
    lengths = lengths or default_lengths(artifact.config.max_position)
    summary["capacity"] = capacity.to_dict(lengths)
    lines.append(capacity.table(lengths))
    summary["text"] = "\n".join(lines)
    return summary, (path / IR_FILE).read_text()
