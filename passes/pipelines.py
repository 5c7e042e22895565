"""Named pipelines and custom pipeline strings (``"dce,fuse-qkv,quantize(int4,group=32)"``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.options import parse_value
from llmc.passes.base import Pass

PassFactory = Callable[..., Pass]
PASSES: dict[str, PassFactory] = {}
CLEANUP = ["share-tied-weights", "cse", "dce"]
FUSIONS = ["fuse-qkv", "fuse-gate-up", "fuse-add-rmsnorm", "fold-rope"]
PIPELINES: dict[str, list[str]] = {
    "O0": [],
    "O1": list(CLEANUP),
    "O2": ["share-tied-weights", *FUSIONS, "cse", "dce"],
    "O3": ["share-tied-weights", *FUSIONS, "cse", "dce"],
}
PIPELINE_DOCS: dict[str, str] = {
    "O0": "nothing: the front end's graph as built",
    "O1": "cleanup: share tied weights, merge common subexpressions, remove dead code",
    "O2": "O1 + fusions the target lowers (the default)",
    "O3": "O2 + layout/extra passes the target asks for (Target.preferred_passes)",
}


def register_pass(factory: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    if factory.name in PASSES:
        raise ValueError(f"pass {factory.name!r} registered twice")
    PASSES[factory.name] = factory
    return factory


def _load_builtin_passes() -> None:
    import llmc.passes.builtin  # noqa: F401  (registers the passes)


_ITEM = re.compile(r"\s*([a-z0-9_-]+)\s*(?:\((.*?)\))?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Passes from a comma-separated string; arguments in parentheses (``k=v`` or positional)."""
    _load_builtin_passes()
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _ITEM.match(text, pos)
        if match is None or match.end() == pos:
            raise LlmcError(f"cannot parse pipeline {text!r} at {text[pos:]!r}")
        name, raw_args = match.group(1), match.group(2)
        pos = match.end()
        if name not in PASSES:
            raise LlmcError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in (raw_args or "").split(","))):
            key, eq, value = part.partition("=")
            if eq:
                kwargs[key.strip().replace("-", "_")] = parse_value(value)
            else:
                args.append(parse_value(part))
        try:
            passes.append(PASSES[name](*args, **kwargs))
        except (TypeError, ValueError) as exc:
            raise LlmcError(f"bad arguments for pass {name!r}: {exc}") from exc
    return passes


def pipeline_for(opt_level: int, target_ops: frozenset[str], preferred: list[str] | None = None) -> list[Pass]:
    """The named pipeline ``O<opt_level>`` (or the target's ``preferred`` pass list for that
    level), keeping only passes whose fused ops the target runs."""
    _load_builtin_passes()
    key = f"O{opt_level}"
    if key not in PIPELINES:
        raise LlmcError(f"unknown optimization level {opt_level}; levels: {', '.join(PIPELINES)}")
    names = PIPELINES[key] if preferred is None else preferred
    passes = parse_pipeline(",".join(names)) if names else []
    return [p for p in passes if p.produces <= target_ops]
