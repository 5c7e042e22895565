"""``llmc targets``: every registered target, whether it runs here (and why not), what it supports."""

from __future__ import annotations

import json

from click.testing import CliRunner

from llmc.cli import main
from llmc.runtime.registry import target_names


def test_targets_json_lists_every_target_with_its_capabilities() -> None:
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["name"] for r in records] == target_names()
    by_name = {r["name"]: r for r in records}
    torch = by_name["torch"]
    assert torch["available"] is True and torch["reason"] is None
    assert "cpu" in torch["devices"] and {"none", "int4", "int8", "native"} <= set(torch["quant_modes"])
    assert torch["kv_layout"] == "paged" and torch["deterministic"] is True and torch["doc"]
    for r in records:
        assert r["available"] == (r["reason"] is None)  # unavailable ones say why
        if not r["available"]:
            assert r["reason"]


def test_targets_text_says_what_runs_here() -> None:
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    torch_line = next(line for line in lines if line.startswith("torch"))
    assert torch_line.split() == ["torch", "available"]
    assert any("devices cpu" in line and "quant" in line for line in lines)
    for line in lines:
        if "unavailable:" in line:
            assert line.split("unavailable:", 1)[1].strip()  # with the reason


def test_compile_help_points_at_a_command_that_exists() -> None:
    result = CliRunner().invoke(main, ["compile", "--help"])
    assert "llmc targets" in result.output
    assert "targets" in main.commands
