"""Runs a pipeline of passes: verifies after each, times it, records stats, dumps the IR."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.compiler.errors import IRError, LlmcError, PassError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.ops import OPS
from llmc.compiler.ir.printer import print_module
from llmc.compiler.ir.verify import verify_module
from llmc.compiler.progress import step
from llmc.passes.base import Pass, PassContext


@dataclass
class PassRecord:
    """What one pass did: for the manifest, ``llmc inspect`` and ``--dump-ir`` readers."""

    name: str
    changed: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "changed": self.changed, "seconds": round(self.seconds, 6),
                                "stats": self.stats, "nodes": [self.nodes_before, self.nodes_after]}
        if self.rejections:
            data["rejections"] = self.rejections
        return data


def _node_count(module: Module) -> int:
    return sum(len(fn.nodes) for fn in module)


class PassManager:
    """Applies passes in order. ``dump_dir`` receives ``00-input.ir``, ``01-<pass>.ir``, ..."""

    def __init__(self, passes: list[Pass], verify: bool = True, dump_dir: Path | None = None) -> None:
        self.passes = passes
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def run(self, module: Module, ctx: PassContext) -> Module:
        self._check_target(ctx)
        if self.verify:
            verify_module(module)
        self._dump(0, "input", module)
        done: list[str] = []
        with step("passes", total=len(self.passes)) as progress:
            for number, p in enumerate(self.passes, start=1):
                module = self._run_one(number, p, module, ctx, done)
                progress.advance(p.describe())
        self._check_ops(module, ctx, done)
        return module

    def _run_one(self, number: int, p: Pass, module: Module, ctx: PassContext, done: list[str]) -> Module:
        """Run, verify, record and dump one pass; ``done`` gets its name."""
        start = time.perf_counter()
        try:
            result = p.run(module, ctx)
        except LlmcError:
            raise
        except Exception as exc:
            raise PassError(f"pass {p.describe()!r} failed: {exc} (passes run before: {done or 'none'})") from exc
        elapsed = time.perf_counter() - start
        if self.verify:
            try:
                verify_module(result.module)
            except IRError as exc:
                self._dump(number, f"{p.name}.broken", result.module)
                raise PassError(
                    f"pass {p.describe()!r} left the IR malformed: {exc} (passes run before: {done or 'none'})"
                ) from exc
        self.records.append(PassRecord(p.describe(), result.changed, elapsed, dict(result.stats),
                                       dict(result.rejections), _node_count(module),
                                       _node_count(result.module)))
        module = result.module
        self._dump(number, p.name, module)
        done.append(p.describe())
        return module

    @staticmethod
    def _check_ops(module: Module, ctx: PassContext, done: list[str]) -> None:
        """No pipeline may leave a fused op the target cannot lower."""
        for fn in module:
            for node in fn.nodes:
                if OPS[node.op].fused and node.op not in ctx.target_ops:
                    raise PassError(
                        f"function {fn.name!r} contains fused op {node.op!r}, which target "
                        f"{ctx.target_name!r} cannot run (passes run: {done or 'none'})"
                    )

    def _check_target(self, ctx: PassContext) -> None:
        for p in self.passes:
            missing = p.produces - ctx.target_ops
            if missing:
                raise PassError(
                    f"pass {p.describe()!r} produces {sorted(missing)}, which target {ctx.target_name!r} cannot run",
                    hint="drop the pass from --passes or choose another target",
                )

    def _dump(self, number: int, name: str, module: Module) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{number:02d}-{name}.ir").write_text(print_module(module))
