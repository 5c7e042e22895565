"""Rewrite rules: a pattern, an optional check and a replacement built with :class:`RewriteBuilder`.

A :class:`Rule` is a pattern (one or more root op patterns sharing named variables, see
:mod:`llmc.passes.pattern`), an optional ``check(match) -> reason | None`` that may reject a
structural match, and a ``rewrite(match, builder) -> {capture: new value}`` that builds
replacement nodes and says which captured results they replace. Several captured results may
be replaced at once (the fused ``add_rms_norm`` replaces both the old ``rms_norm`` and the old
``add``). :func:`llmc.passes.rule_engine.apply_rules` applies rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llmc.compiler.errors import PassError
from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import AttrValue, Node, ParamInfo, Value
from llmc.compiler.weights import Loader, Weight
from llmc.passes.base import PassContext
from llmc.passes.pattern import Match, OpPattern


class RewriteBuilder:
    """Builds replacement nodes; new params are committed only if the match is accepted."""

    def __init__(self, params: dict[str, ParamInfo], ctx: PassContext) -> None:
        self.ctx = ctx
        self._params = params
        self.pending: dict[str, tuple[ParamInfo, Weight | Loader]] = {}
        self._view: dict[str, ParamInfo] = dict(params)
        self._builder = Builder(self._view)

    @property
    def nodes(self) -> list[Node]:
        return self._builder.nodes

    def has_param(self, name: str) -> bool:
        return name in self._view

    def param_info(self, name: str) -> ParamInfo:
        return self._view[name]

    def param(self, name: str) -> Value:
        """A node reading an existing (or pending) param."""
        return self._builder.param(name)

    def add_param(self, info: ParamInfo, weight: Weight | Loader) -> Value:
        """Declare a new param (its weight may be a loader, run when first read)."""
        if info.name in self._view:
            raise PassError(f"param {info.name!r} already exists")
        self.pending[info.name] = (info, weight)
        self._view[info.name] = info
        return self._builder.param(info.name)

    def node(self, op_name: str, *inputs: Value, **attrs: AttrValue) -> Node:
        return self._builder.node(op_name, *inputs, **attrs)

    def op(self, op_name: str, *inputs: Value, **attrs: AttrValue) -> Value:
        return self._builder.op(op_name, *inputs, **attrs)

    def commit(self) -> None:
        for name, (info, weight) in self.pending.items():
            self._params[name] = info
            if callable(weight):
                self.ctx.weights.set_lazy(name, weight)
            else:
                self.ctx.weights[name] = weight


Check = Callable[[Match], "str | None"]
Rewrite = Callable[[Match, RewriteBuilder], "Mapping[str, Value]"]


@dataclass(frozen=True)
class Rule:
    """A pattern (one or more roots sharing variables), a check and a replacement."""

    name: str
    roots: tuple[OpPattern, ...]
    rewrite: Rewrite
    check: Check | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.roots:
            raise ValueError(f"rule {self.name!r} has no pattern")

    @classmethod
    def single(cls, name: str, pattern: OpPattern, rewrite: Rewrite, check: Check | None = None,
               doc: str = "") -> Rule:
        return cls(name, (pattern,), rewrite, check, doc)
