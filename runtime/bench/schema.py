"""The JSON schema of ``llmc bench`` / ``benchmarks/peers.py`` reports (documented in docs/bench_schema.md).

``python -m llmc.runtime.bench.schema`` prints it; :func:`validate` checks a report against it.
"""

from __future__ import annotations

import json
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import install_hint

SCHEMA_NAME = "llmc-bench"
SCHEMA_VERSION = 1

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

_SUMMARY = {
    "type": ["object", "null"],
    "description": "seconds over all samples of a point",
    "required": ["p50", "p95", "mean", "min", "max", "n"],
    "properties": {"p50": _NUM, "p95": _NUM, "mean": _NUM, "min": _NUM, "max": _NUM,
                   "n": {"type": "integer", "minimum": 1}},
    "additionalProperties": False,
}

_RESULT = {
    "type": "object",
    "required": ["engine", "label", "scenario", "size", "prompt_len", "gen_len", "repeats", "prefill_tok_s",
                 "decode_tok_s", "aggregate_tok_s", "ttft_s", "tpot_s", "e2e_s", "output_tokens", "roofline",
                 "peak_rss_bytes", "gpu_peak_bytes", "load_average", "wall_s", "error"],
    "properties": {
        "engine": {"type": "string"},
        "label": {"type": "string"},
        "scenario": {"enum": ["single", "batch", "concurrency"]},
        "size": {"type": "integer", "minimum": 1, "description": "batch size or number of concurrent requests"},
        "prompt_len": {"type": "integer", "minimum": 1},
        "gen_len": {"type": "integer", "minimum": 1},
        "repeats": {"type": "integer", "minimum": 1},
        "prefill_tok_s": _NUM_OR_NULL,
        "decode_tok_s": _NUM_OR_NULL,
        "aggregate_tok_s": _NUM_OR_NULL,
        "ttft_s": _SUMMARY,
        "tpot_s": _SUMMARY,
        "e2e_s": _SUMMARY,
        "output_tokens": {"type": "integer", "minimum": 0},
        "roofline": {
            "type": ["object", "null"],
            "required": ["weight_bytes_per_step", "limit_tok_s", "pct"],
            "properties": {"weight_bytes_per_step": {"type": "integer"}, "limit_tok_s": _NUM_OR_NULL,
                           "pct": _NUM_OR_NULL},
            "additionalProperties": False,
        },
        "peak_rss_bytes": _INT_OR_NULL,
        "gpu_peak_bytes": _INT_OR_NULL,
        "load_average": {"type": ["array", "null"], "items": _NUM},
        "wall_s": _NUM,
        "error": _STR_OR_NULL,
    },
    "additionalProperties": False,
}

_BACKEND = {
    "type": "object",
    "required": ["engine", "label", "version", "weight_bytes", "weight_bytes_per_step", "embed_row_bytes",
                 "threads", "device", "details"],
    "properties": {
        "engine": {"type": "string"}, "label": {"type": "string"}, "version": _STR_OR_NULL,
        "weight_bytes": {"type": "integer", "minimum": 0}, "weight_bytes_per_step": {"type": "integer", "minimum": 0},
        "embed_row_bytes": {"type": "integer", "minimum": 0}, "threads": _INT_OR_NULL, "device": {"type": "string"},
        "details": {"type": "object"},
    },
    "additionalProperties": False,
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "llmc benchmark report",
    "type": "object",
    "required": ["schema", "schema_version", "created", "command", "machine", "software", "bandwidth", "settings",
                 "model", "backends", "results", "notes"],
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "created": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "machine": {
            "type": "object",
            "required": ["cpu_model", "cpu_flags", "logical_cores", "physical_cores", "memory_bytes", "os", "python",
                         "load_average", "gpu"],
            "properties": {
                "cpu_model": {"type": "string"}, "cpu_flags": {"type": "array", "items": {"type": "string"}},
                "logical_cores": _INT_OR_NULL, "physical_cores": _INT_OR_NULL, "memory_bytes": _INT_OR_NULL,
                "os": {"type": "string"}, "python": {"type": "string"},
                "load_average": {"type": ["array", "null"], "items": _NUM}, "gpu": _STR_OR_NULL,
            },
        },
        "software": {"type": "object", "required": ["llmc"], "additionalProperties": _STR_OR_NULL},
        "bandwidth": {
            "type": ["object", "null"],
            "required": ["bytes_per_s", "method", "threads"],
            "properties": {"bytes_per_s": _NUM, "method": {"type": "string"}, "threads": {"type": "integer"}},
        },
        "settings": {
            "type": "object",
            "required": ["scenarios", "batch_sizes", "concurrency", "prompt_len", "gen_len", "warmup", "repeat",
                         "seed", "threads"],
            "properties": {
                "scenarios": {"type": "array", "items": {"enum": ["single", "batch", "concurrency"]}},
                "batch_sizes": {"type": "array", "items": {"type": "integer"}},
                "concurrency": {"type": "array", "items": {"type": "integer"}},
                "prompt_len": {"type": "integer"}, "gen_len": {"type": "integer"}, "warmup": {"type": "integer"},
                "repeat": {"type": "integer"}, "seed": {"type": "integer"}, "threads": _INT_OR_NULL,
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "vocab_size", "num_layers", "hidden_size"],
            "properties": {"name": {"type": "string"}, "vocab_size": {"type": "integer"},
                           "num_layers": {"type": "integer"}, "hidden_size": {"type": "integer"}},
        },
        "backends": {"type": "array", "items": _BACKEND},
        "results": {"type": "array", "items": _RESULT},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def validate(report: dict[str, Any]) -> None:
    """Raise :class:`LlmcError` naming the first place where ``report`` breaks :data:`SCHEMA`."""
    try:
        import jsonschema
    except ImportError as exc:
        raise LlmcError("validating a bench report needs jsonschema", hint=install_hint("bench")) from exc
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise LlmcError(f"bench report does not follow the schema at {where}: {first.message}")


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(SCHEMA, indent=1))
