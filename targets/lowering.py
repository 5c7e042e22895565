"""Per-op lowering tables: the one way a target says how it lowers each IR op.

A :class:`LoweringTable` maps every op of the IR op table (:data:`llmc.compiler.ir.ops.OPS`)
to either a *handler* (whatever the target's lowering calls for a node of that op: a kernel
factory, a graph-emitting function, ...) or an explicit :class:`Refusal` naming why the target
cannot lower it. ``input`` and ``param`` are structural (every lowering binds function inputs
and weights itself) and need no entry. A table that misses an op is incomplete, and
``tests/targets/test_op_tables.py`` fails for it; :attr:`LoweringTable.ops` is what the target
declares as :attr:`Capabilities.ops <llmc.runtime.target.Capabilities.ops>` (the same test
checks the two agree).

A target that reuses another's lowering derives its table with :meth:`LoweringTable.extend`
(TensorRT over ONNX), replacing handlers or refusing ops, instead of patching the other's
lowering object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.ops import OPS

H = TypeVar("H")

STRUCTURAL_OPS = frozenset({"input", "param"})
"""Ops every lowering handles by itself: function inputs and weight reads."""


@dataclass(frozen=True)
class Refusal:
    """An op a target does not lower, and why (shown to the user when a module contains it)."""

    reason: str


class LoweringTable(Generic[H]):
    """``op -> handler | Refusal`` for one target, covering the IR op table."""

    def __init__(self, target: str, entries: Mapping[str, H | Refusal]) -> None:
        unknown = sorted(set(entries) - set(OPS))
        if unknown:
            raise ValueError(f"the {target} lowering table names ops the IR does not have: {unknown}")
        structural = sorted(set(entries) & STRUCTURAL_OPS)
        if structural:
            raise ValueError(f"the {target} lowering table lists structural ops {structural}")
        self.target = target
        self._entries: dict[str, H | Refusal] = dict(entries)

    def __contains__(self, op: str) -> bool:
        return op in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, op: str) -> H | Refusal | None:
        """The handler or refusal of ``op`` (None when the table misses it)."""
        return self._entries.get(op)

    @property
    def ops(self) -> frozenset[str]:
        """The ops this target lowers: the structural ones and every op with a handler."""
        return STRUCTURAL_OPS | frozenset(op for op, e in self._entries.items() if not isinstance(e, Refusal))

    @property
    def refused(self) -> dict[str, str]:
        """Refused op -> reason."""
        return {op: e.reason for op, e in self._entries.items() if isinstance(e, Refusal)}

    def missing(self) -> list[str]:
        """Ops of the IR op table with neither a handler nor a refusal (empty for a complete table)."""
        return sorted(set(OPS) - STRUCTURAL_OPS - set(self._entries))

    def handler(self, op: str) -> H:
        """The handler of ``op``; raises :class:`UnsupportedError` with the refusal's reason."""
        entry = self._entries.get(op)
        if entry is None:
            raise UnsupportedError(f"the {self.target} target cannot lower op {op!r}: its lowering table has no "
                                   "entry for it")
        if isinstance(entry, Refusal):
            raise UnsupportedError(f"the {self.target} target cannot lower op {op!r}: {entry.reason}")
        return entry

    def check_module(self, module: Module) -> None:
        """Refuse, before any lowering work, the first op of ``module`` this target does not lower."""
        for fn in module:
            for node in fn.nodes:
                if node.op not in STRUCTURAL_OPS:
                    try:
                        self.handler(node.op)
                    except UnsupportedError as exc:
                        raise UnsupportedError(f"{exc} (function {fn.name})") from None

    def extend(self, target: str, entries: Mapping[str, H | Refusal]) -> LoweringTable[H]:
        """A table for ``target``: this one with ``entries`` replacing (or refusing) some ops."""
        return LoweringTable(target, {**self._entries, **entries})
