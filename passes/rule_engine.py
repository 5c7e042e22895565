"""The rewrite engine: applies :class:`~llmc.passes.rules.Rule` s to every function of a module.

Each rule runs to a fixpoint, in sweeps over a function's (fixed) node list. Nodes are
immutable: a sweep collects the accepted matches, then builds a new node list, remaps every use
of a replaced value, keeps topological order (:func:`~llmc.compiler.ir.surgery.rebuild_nodes`)
and drops the matched nodes that are left without users. A matched intermediate result that is
neither replaced nor used only inside the match makes the engine reject the match (the pattern
would otherwise duplicate work), as does a rewrite that would drop a side-effecting op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llmc.compiler.errors import PassError
from llmc.compiler.ir.graph import Function, Module, Node, Value
from llmc.compiler.ir.ops import OPS
from llmc.compiler.ir.surgery import drop_unused_params, rebuild_nodes
from llmc.passes.base import PassContext
from llmc.passes.pattern import EMPTY_STATE, LEAF_OPS, Match, OpPattern, State, direct_vars, match_pattern, op_captures
from llmc.passes.rules import RewriteBuilder, Rule

MAX_SWEEPS = 8


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
        self.op_captures = frozenset().union(*(op_captures(r) for r in rule.roots))
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
        pools = [self.users.get(binds[name], []) for name in direct_vars(root) if name in binds]
        pool = min(pools, key=len) if pools else self.by_op.get(root.op, [])
        return sorted((n for n in pool if n.op == root.op and self.position.get(id(n), -1) > after),
                      key=lambda n: self.position[id(n)])

    def _match_roots(self, anchor: Node) -> Iterator[State]:
        roots = self.rule.roots

        def extend(i: int, state: State, after: int) -> Iterator[State]:
            if i == len(roots):
                yield state
                return
            for cand in self._candidates(roots[i], state[0], after):
                for inner in match_pattern(roots[i], cand.out(roots[i].result), state, self.blocked):
                    yield from extend(i + 1, inner, self.position[id(cand)])

        for state in match_pattern(roots[0], anchor.out(roots[0].result), EMPTY_STATE, self.blocked):
            yield from extend(1, state, self.position[id(anchor)])

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def _try(self, state: State) -> None:
        binds, nodes, _ = state
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
                fn = drop_unused_params(sweep.rebuilt(), matched_params)
            out.functions[name] = fn
            for reason, count in last_rejections.items():
                key = f"{rule.name}: {reason}"
                stats.rejections[key] = stats.rejections.get(key, 0) + count
        stats.matches.setdefault(rule.name, 0)
    return out, stats
