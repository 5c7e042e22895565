"""The pattern language of rewrite rules, and structural matching.

Patterns::

    op("linear", var("x"), param(capture="w"), capture="lin")   # a linear of any x by a param
    op("rms_norm", op("add", var("a"), var("b"), capture="sum"), var("w"), capture="norm")
    op("param", name="lm_head")                                 # attribute equal to a value
    op("rope", var("q"), var("pos"), rotary_dim=lambda d: d > 0)  # attribute predicate
    op("split", var("x"), result=1)                             # the second result of a split

``add`` and ``mul`` match their operands in either order (``commutative=`` overrides). A
variable bound twice must bind the same value. One result cannot play two parts of a pattern;
a multi-result node (``split``) may play one part per result. A :class:`Match` is what a rule's
``check`` and ``rewrite`` read; rules and the engine that applies them are in
:mod:`llmc.passes.rules` and :mod:`llmc.passes.rule_engine`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.ir.graph import Function, Module, Node, ParamInfo, Value
from llmc.compiler.ir.ops import OPS
from llmc.compiler.weights import Weight
from llmc.passes.base import PassContext

COMMUTATIVE_OPS = frozenset({"add", "mul"})
LEAF_OPS = frozenset({"param", "input"})

# -- patterns -------------------------------------------------------------------------------
class Pattern:
    """Base class of pattern nodes."""


@dataclass(frozen=True)
class Var(Pattern):
    """Matches any value and binds it to ``name`` (the same name must bind the same value)."""

    name: str


@dataclass(frozen=True)
class Wildcard(Pattern):
    """Matches any value, binds nothing."""


@dataclass(frozen=True)
class OpPattern(Pattern):
    """Matches result ``result`` of a node of ``op`` whose attributes satisfy ``attrs``."""

    op: str
    operands: tuple[Pattern, ...] | None
    capture: str | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    result: int = 0
    commutative: bool | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"pattern names unknown op {self.op!r}")

    @property
    def is_commutative(self) -> bool:
        if self.commutative is not None:
            return self.commutative
        return self.op in COMMUTATIVE_OPS


ANY = Wildcard()


def var(name: str) -> Var:
    return Var(name)


def op(op_name: str, /, *operands: Pattern, capture: str | None = None, result: int = 0,
       commutative: bool | None = None, any_operands: bool = False, **attrs: Any) -> OpPattern:
    """An op pattern; keyword arguments are attribute values or predicates ``attr -> bool``."""
    return OpPattern(op_name, None if any_operands else tuple(operands), capture, dict(attrs), result, commutative)


def param(capture: str | None = None, **attrs: Any) -> OpPattern:
    """A ``param`` node, e.g. ``param("w")`` or ``param(name="lm_head")``."""
    return OpPattern("param", (), capture, dict(attrs))


# -- matches --------------------------------------------------------------------------------
@dataclass
class Match:
    """A structural match: captured values by name and the matched op nodes."""

    captures: dict[str, Value]
    nodes: tuple[Node, ...]
    module: Module
    function: Function
    ctx: PassContext

    def __getitem__(self, name: str) -> Value:
        return self.captures[name]

    def node(self, name: str) -> Node:
        return self.captures[name].node

    def attr(self, name: str, key: str) -> Any:
        return self.captures[name].node.attrs[key]

    def param_name(self, name: str) -> str:
        node = self.node(name)
        if node.op != "param":
            raise KeyError(f"capture {name!r} is a {node.op}, not a param")
        return str(node.attrs["name"])

    def param_info(self, name: str) -> ParamInfo:
        return self.module.params[self.param_name(name)]

    def weight(self, name: str) -> Weight:
        return self.ctx.weights[self.param_name(name)]


State = tuple[dict[str, Value], tuple[Node, ...], tuple[Value, ...]]
"""A partial match: bound names, matched nodes, and the matched results of non-leaf nodes."""

EMPTY_STATE: State = ({}, (), ())


def match_pattern(pat: Pattern, value: Value, state: State, blocked: set[int]) -> Iterator[State]:
    """Every way ``pat`` matches ``value`` extending ``state`` (nodes in ``blocked`` never match)."""
    binds, nodes, values = state
    if isinstance(pat, Wildcard):
        yield state
        return
    if isinstance(pat, Var):
        bound = binds.get(pat.name)
        if bound is None:
            yield {**binds, pat.name: value}, nodes, values
        elif bound == value:
            yield state
        return
    assert isinstance(pat, OpPattern)
    node = value.node
    if node.op != pat.op or value.index != pat.result or id(node) in blocked:
        return
    for key, want in pat.attrs.items():
        if key not in node.attrs:
            return
        have = node.attrs[key]
        if callable(want):
            if not want(have):
                return
        elif have != want:
            return
    leaf = node.op in LEAF_OPS
    if not leaf and value in values:
        return  # one result cannot play two parts of a pattern
    if pat.capture is not None:
        bound = binds.get(pat.capture)
        if bound is not None and bound != value:
            return
        binds = {**binds, pat.capture: value}
    state = (binds, nodes if any(n is node for n in nodes) else (*nodes, node), values if leaf else (*values, value))
    if pat.operands is None:
        yield state
        return
    if len(pat.operands) != len(node.inputs):
        return
    orders = [pat.operands]
    if pat.is_commutative and len(pat.operands) == 2:
        orders.append((pat.operands[1], pat.operands[0]))
    for order in orders:
        yield from _match_all(order, node.inputs, state, blocked)


def _match_all(pats: Sequence[Pattern], values: Sequence[Value], state: State, blocked: set[int]) -> Iterator[State]:
    if not pats:
        yield state
        return
    for inner in match_pattern(pats[0], values[0], state, blocked):
        yield from _match_all(pats[1:], values[1:], inner, blocked)


def op_captures(pat: Pattern) -> set[str]:
    """The capture names of the op patterns in ``pat`` (what a rewrite may replace)."""
    if not isinstance(pat, OpPattern):
        return set()
    found = {pat.capture} if pat.capture else set()
    for sub in pat.operands or ():
        found |= op_captures(sub)
    return found


def direct_vars(pat: OpPattern) -> list[str]:
    """Names of the variables that are direct operands of ``pat``."""
    return [p.name for p in pat.operands or () if isinstance(p, Var)]
