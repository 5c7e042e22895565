"""``llmc bench`` checks the bench extra before it loads or runs anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.runtime import bench as bench_package


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(bench_package.importlib.util, "find_spec",
                        lambda name, *a: None if name in modules else real(name, *a))


def test_missing_bench_extra_is_reported_before_anything_runs(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    _without(monkeypatch, "jsonschema", "matplotlib")
    # the model does not even exist: the dependency check must come first
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "missing"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2
    assert "llmc bench needs jsonschema, matplotlib" in result.output
    assert "pip install 'llmc-toolchain[bench]'" in result.output
    assert "no such file" not in result.output


def test_only_what_the_run_uses_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "matplotlib", "tqdm")
    assert bench_package.missing_dependencies(plot=False, quiet=True) == []
    assert bench_package.missing_dependencies(plot=False, quiet=False) == ["tqdm"]
    assert bench_package.missing_dependencies(plot=True, quiet=True) == ["matplotlib"]


def test_run_bench_checks_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without(monkeypatch, "jsonschema")
    with pytest.raises(bench_package.LlmcError, match="needs jsonschema"):
        bench_package.run_bench(tmp_path / "missing", bench_package.BenchSettings(), quiet=True)
