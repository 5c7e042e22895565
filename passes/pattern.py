"""Declarative rewrite rules over the IR, and the engine that applies them.

A :class:`Rule` is a pattern (one or more root op patterns sharing named variables), an
optional ``check(match) -> reason | None`` that may reject a structural match, and a
``rewrite(match, builder) -> {capture: new value}`` that builds replacement nodes and says
which captured results they replace. Several captured results may be replaced at once (the
fused ``add_rms_norm`` replaces both the old ``rms_norm`` and the old ``add``).

Patterns::

    op("linear", var("x"), param(capture="w"), capture="lin")   # a linear of any x by a param
    op("rms_norm", op("add", var("a"), var("b"), capture="sum"), var("w"), capture="norm")
    op("param", name="lm_head")                                 # attribute equal to a value
    op("rope", var("q"), var("pos"), rotary_dim=lambda d: d > 0)  # attribute predicate

``add`` and ``mul`` match their operands in either order (``commutative=`` overrides). A
variable bound twice must bind the same value. Nodes are immutable: the engine builds a new
node list, remaps every use of a replaced value, keeps topological order and drops the
matched nodes that are left without users. A matched intermediate result that is neither
replaced nor used only inside the match makes the engine reject the match (the pattern
would otherwise duplicate work).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.errors import PassError
from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import AttrValue, Function, Module, Node, ParamInfo, Value
from llmc.compiler.ir.ops import OPS
from llmc.compiler.weights import Loader, Weight
from llmc.passes.base import PassContext

COMMUTATIVE_OPS = frozenset({"add", "mul"})
LEAF_OPS = frozenset({"param", "input"})
MAX_SWEEPS = 8


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


_State = tuple[dict[str, Value], tuple[Node, ...]]


def _match(pat: Pattern, value: Value, state: _State, blocked: set[int]) -> Iterator[_State]:
    binds, nodes = state
    if isinstance(pat, Wildcard):
        yield state
        return
    if isinstance(pat, Var):
        bound = binds.get(pat.name)
        if bound is None:
            yield {**binds, pat.name: value}, nodes
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
    if node.op not in LEAF_OPS and any(n is node for n in nodes):
        return  # one node cannot play two parts of a pattern
    if pat.capture is not None:
        bound = binds.get(pat.capture)
        if bound is not None and bound != value:
            return
        binds = {**binds, pat.capture: value}
    state = (binds, (*nodes, node) if not any(n is node for n in nodes) else nodes)
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


def _match_all(pats: Sequence[Pattern], values: Sequence[Value], state: _State, blocked: set[int]) -> Iterator[_State]:
    if not pats:
        yield state
        return
    for inner in _match(pats[0], values[0], state, blocked):
        yield from _match_all(pats[1:], values[1:], inner, blocked)


def _op_captures(pat: Pattern) -> set[str]:
    if not isinstance(pat, OpPattern):
        return set()
    found = {pat.capture} if pat.capture else set()
    for sub in pat.operands or ():
        found |= _op_captures(sub)
    return found


def _direct_vars(pat: OpPattern) -> list[str]:
    return [p.name for p in pat.operands or () if isinstance(p, Var)]


# -- rewriting ------------------------------------------------------------------------------
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


@dataclass
class RuleStats:
    """Matches applied and matches rejected (with the reason of each rejection)."""

    matches: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)

    @property
    def total_matches(self) -> int:
        return sum(self.matches.values())

    @property
    def total_rejections(self) -> int:
        return sum(self.rejections.values())

    def as_stats(self) -> dict[str, int]:
        stats = {"matches": self.total_matches, "rejected": self.total_rejections}
        if len(self.matches) > 1:
            stats |= {f"matches[{k}]": v for k, v in self.matches.items()}
        return stats


def _users(nodes: Sequence[Node]) -> dict[Value, list[Node]]:
    users: dict[Value, list[Node]] = {}
    for node in nodes:
        for v in node.inputs:
            users.setdefault(v, []).append(node)
    return users


@dataclass
class _Accepted:
    anchor_pos: int
    new_nodes: list[Node]
    remap: dict[Value, Value]
    consumed: list[Node]


class _Sweep:
    """One pass of one rule over one function's (fixed) node list."""

    def __init__(self, rule: Rule, fn: Function, module: Module, ctx: PassContext) -> None:
        self.rule, self.fn, self.module, self.ctx = rule, fn, module, ctx
        self.position = {id(n): i for i, n in enumerate(fn.nodes)}
        self.users = _users(fn.nodes)
        self.outputs = set(fn.outputs.values())
        self.blocked: set[int] = set()
        self.accepted: list[_Accepted] = []
        self.rejections: dict[str, int] = {}
        self.op_captures = frozenset().union(*(_op_captures(r) for r in rule.roots))
        self.by_op: dict[str, list[Node]] = {}
        for node in fn.nodes:
            self.by_op.setdefault(node.op, []).append(node)

    def run(self) -> None:
        first = self.rule.roots[0]
        for node in list(self.by_op.get(first.op, ())):
            if id(node) in self.blocked:
                continue
            state = next(self._match_roots(node), None)
            if state is None:
                continue
            self._try(state)

    def _candidates(self, root: OpPattern, binds: dict[str, Value], after: int) -> list[Node]:
        pools = [self.users.get(binds[name], []) for name in _direct_vars(root) if name in binds]
        pool = min(pools, key=len) if pools else self.by_op.get(root.op, [])
        return sorted((n for n in pool if n.op == root.op and self.position.get(id(n), -1) > after),
                      key=lambda n: self.position[id(n)])

    def _match_roots(self, anchor: Node) -> Iterator[_State]:
        roots = self.rule.roots
        start: _State = ({}, ())

        def extend(i: int, state: _State, after: int) -> Iterator[_State]:
            if i == len(roots):
                yield state
                return
            for cand in self._candidates(roots[i], state[0], after):
                for inner in _match(roots[i], cand.out(roots[i].result), state, self.blocked):
                    yield from extend(i + 1, inner, self.position[id(cand)])

        for state in _match(roots[0], anchor.out(roots[0].result), start, self.blocked):
            yield from extend(1, state, self.position[id(anchor)])

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _try(self, state: _State) -> None:
        binds, nodes = state
        match = Match(dict(binds), nodes, self.module, self.fn, self.ctx)
        if self.rule.check is not None:
            reason = self.rule.check(match)
            if reason:
                self._reject(reason)
                return
        rb = RewriteBuilder(self.module.params, self.ctx)
        try:
            replaced = dict(self.rule.rewrite(match, rb))
        except PassError:
            raise
        except Exception as exc:  # a bug in the rule: name it
            raise PassError(f"rule {self.rule.name!r}: rewrite failed: {exc}") from exc
        reason = self._validate(match, replaced)
        if reason:
            self._reject(reason)
            return
        rb.commit()
        interior = [n for n in nodes if n.op not in LEAF_OPS]
        for n in interior:
            self.blocked.add(id(n))
        for name in replaced:
            self.blocked.add(id(binds[name].node))
        for n in rb.nodes:  # new nodes read old values: they are users outside the match
            for v in n.inputs:
                self.users.setdefault(v, []).append(n)
        remap = {binds[name]: new for name, new in replaced.items()}
        anchor = min(self.position[id(v.node)] for v in remap)
        self.accepted.append(_Accepted(anchor, list(rb.nodes), remap, interior))

    def _validate(self, match: Match, replaced: dict[str, Value]) -> str | None:
        matched = {id(n) for n in match.nodes}
        remapped: set[Value] = set()
        for name, new in replaced.items():
            if name not in self.op_captures or name not in match.captures:
                raise PassError(f"rule {self.rule.name!r} replaces {name!r}, which is not a captured op result")
            old = match.captures[name]
            if old.node.op == "input":
                raise PassError(f"rule {self.rule.name!r} replaces a function input")
            if old.type != new.type:
                raise PassError(f"rule {self.rule.name!r} replaces {name!r} ({old.type}) with a {new.type}")
            remapped.add(old)
        for node in match.nodes:
            if node.op in LEAF_OPS:
                continue
            for value in node.outputs:
                if value in remapped:
                    continue
                if value in self.outputs:
                    return f"{node.op} result is a function output"
                outside = [u for u in self.users.get(value, []) if id(u) not in matched]
                if outside:
                    return f"{node.op} result has users outside the pattern"
            if OPS[node.op].side_effect and not any(v in remapped for v in node.outputs):
                return f"the rewrite would drop side-effecting {node.op}"
        return None

    def rebuilt(self) -> Function:
        """The function with accepted rewrites applied, in topological order."""
        remap: dict[Value, Value] = {}
        consumed: set[int] = set()
        inserts: dict[int, list[Node]] = {}
        for acc in self.accepted:
            remap.update(acc.remap)
            consumed.update(id(n) for n in acc.consumed)
            inserts.setdefault(acc.anchor_pos, []).extend(acc.new_nodes)
        for acc in self.accepted:
            for old in acc.remap:
                if old.node.op == "param":
                    consumed.add(id(old.node))
        preferred: list[Node] = []
        for i, node in enumerate(self.fn.nodes):
            preferred.extend(inserts.get(i, ()))
            if id(node) not in consumed:
                preferred.append(node)
        nodes, outputs = rebuild_nodes(preferred, remap, self.fn.outputs, self.rule.name)
        return Function(self.fn.name, nodes, outputs)


def _resolve(value: Value, remap: Mapping[Value, Value]) -> Value:
    seen = 0
    while value in remap:
        value = remap[value]
        seen += 1
        if seen > 10_000:
            raise PassError("cyclic value remapping")
    return value


def rebuild_nodes(preferred: Sequence[Node], remap: Mapping[Value, Value], outputs: Mapping[str, Value],
                  who: str = "rewrite") -> tuple[list[Node], dict[str, Value]]:
    """Apply ``remap`` to every operand, clone the nodes whose operands changed and order
    ``preferred`` topologically (stable: a node moves only to follow its operands)."""
    present = {id(n): n for n in preferred}
    rank = {id(n): i for i, n in enumerate(preferred)}

    def deps(node: Node) -> list[Node]:
        out = []
        for v in node.inputs:
            dep = _resolve(v, remap).node
            if id(dep) not in present:
                raise PassError(f"{who}: {node.op} reads a result of a removed {dep.op} node")
            out.append(dep)
        return sorted(out, key=lambda n: rank[id(n)])

    order: list[Node] = []
    state: dict[int, int] = {}  # 1 visiting, 2 done
    for root in preferred:
        if state.get(id(root)) == 2:
            continue
        stack: list[tuple[Node, Iterator[Node]]] = [(root, iter(deps(root)))]
        state[id(root)] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
                continue
            s = state.get(id(nxt))
            if s == 1:
                raise PassError(f"{who}: the rewrite created a cycle through {nxt.op}")
            if s is None:
                state[id(nxt)] = 1
                stack.append((nxt, iter(deps(nxt))))
    clones: dict[int, Node] = {}

    def final(v: Value) -> Value:
        v = _resolve(v, remap)
        clone = clones.get(id(v.node))
        return Value(clone, v.index) if clone is not None else v

    result: list[Node] = []
    for node in order:
        inputs = tuple(final(v) for v in node.inputs)
        if any(a != b for a, b in zip(inputs, node.inputs, strict=True)):
            clone = Node(node.op, inputs, dict(node.attrs), node.out_types)
            clones[id(node)] = clone
            node = clone
        result.append(node)
    new_outputs = {name: final(v) for name, v in outputs.items()}
    return result, new_outputs


def _drop_unused_params(fn: Function, candidates: set[str]) -> Function:
    used = {id(v.node) for n in fn.nodes for v in n.inputs} | {id(v.node) for v in fn.outputs.values()}
    nodes = [n for n in fn.nodes if not (n.op == "param" and id(n) not in used and n.attrs["name"] in candidates)]
    return Function(fn.name, nodes, fn.outputs) if len(nodes) != len(fn.nodes) else fn


def apply_rules(module: Module, ctx: PassContext, rules: Sequence[Rule]) -> tuple[Module, RuleStats]:
    """Apply ``rules`` (each to a fixpoint, in order) to every function of ``module``.

    Returns a new module (the input is not modified; new params are added to a copy of its
    param table and their weights to ``ctx.weights``) and the match/rejection counts.
    """
    out = Module(dict(module.functions), dict(module.params), dict(module.config), dict(module.meta))
    stats = RuleStats()
    for rule in rules:
        for name in list(out.functions):
            fn = out.functions[name]
            last_rejections: dict[str, int] = {}
            for sweep_number in range(MAX_SWEEPS + 1):
                sweep = _Sweep(rule, fn, out, ctx)
                sweep.run()
                last_rejections = sweep.rejections
                if not sweep.accepted:
                    break
                if sweep_number == MAX_SWEEPS:
                    raise PassError(f"rule {rule.name!r} still matches after {MAX_SWEEPS} sweeps of function "
                                    f"{name!r}: does its replacement recreate its pattern?")
                stats.matches[rule.name] = stats.matches.get(rule.name, 0) + len(sweep.accepted)
                matched_params = {str(n.attrs["name"]) for acc in sweep.accepted for old in acc.remap
                                  for n in (old.node,) if n.op == "param"}
                matched_params |= {str(v.node.attrs["name"]) for acc in sweep.accepted for n in acc.consumed
                                   for v in n.inputs if v.node.op == "param"}
                fn = _drop_unused_params(sweep.rebuilt(), matched_params)
            out.functions[name] = fn
            for reason, count in last_rejections.items():
                key = f"{rule.name}: {reason}"
                stats.rejections[key] = stats.rejections.get(key, 0) + count
        stats.matches.setdefault(rule.name, 0)
    return out, stats

