"""Every registered target lowers through an op table that covers the whole IR op table.

A target's package holds ``lower.py`` with one :class:`~llmc.targets.lowering.LoweringTable`
named for the target: every op of :data:`llmc.compiler.ir.ops.OPS` (``input`` and ``param``
are structural) has a handler or an explicit refusal with a reason, and the ops with a handler
are exactly what the target declares in ``Capabilities.ops``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.ops import OPS
from llmc.runtime.registry import GROUP, get_target, target_names
from llmc.targets.lowering import STRUCTURAL_OPS, LoweringTable, Refusal


def _lower_module_name(target: str) -> str:
    (ep,) = [ep for ep in entry_points(group=GROUP) if ep.name == target][:1]
    package = ep.value.split(":", 1)[0].rsplit(".", 1)[0]  # llmc.targets.torch.target -> llmc.targets.torch
    return f"{package}.lower"


def _table(target: str) -> LoweringTable:
    name = _lower_module_name(target)
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("llmc"):  # an optional backend (onnx) this machine lacks
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        raise
    tables = [v for v in vars(module).values() if isinstance(v, LoweringTable) and v.target == target]
    assert len(tables) == 1, f"{name} must define one LoweringTable for target {target!r}, found {len(tables)}"
    return tables[0]


@pytest.mark.parametrize("target", target_names())
def test_every_ir_op_has_a_handler_or_a_refusal(target: str) -> None:
    table = _table(target)
    assert table.missing() == [], f"target {target!r} neither lowers nor refuses {table.missing()}"
    for op, reason in table.refused.items():
        assert len(reason) > 20, f"target {target!r} refuses {op!r} without a real reason: {reason!r}"


@pytest.mark.parametrize("target", target_names())
def test_capabilities_declare_exactly_the_ops_the_table_lowers(target: str) -> None:
    assert get_target(target).capabilities().ops == _table(target).ops


@pytest.mark.parametrize("target", target_names())
def test_a_refused_op_raises_its_reason(target: str) -> None:
    table = _table(target)
    for op, reason in table.refused.items():
        with pytest.raises(UnsupportedError, match=op):
            table.handler(op)
        try:
            table.handler(op)
        except UnsupportedError as exc:
            assert reason in str(exc)


def test_the_coverage_check_sees_a_missing_op_and_rejects_unknown_ones() -> None:
    some = sorted(set(OPS) - STRUCTURAL_OPS)
    partial = LoweringTable("demo", {op: (lambda: None) for op in some[1:]})
    assert partial.missing() == [some[0]]
    with pytest.raises(UnsupportedError, match="no entry"):
        partial.handler(some[0])
    refused = partial.extend("demo2", {some[0]: Refusal("demo targets cannot lower this op at all")})
    assert refused.missing() == [] and some[0] not in refused.ops and refused.target == "demo2"
    with pytest.raises(ValueError, match="ops the IR does not have"):
        LoweringTable("demo", {"conv2d": lambda: None})
    with pytest.raises(ValueError, match="structural"):
        LoweringTable("demo", {"param": lambda: None})
