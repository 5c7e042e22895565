"""The CLI contract: commands, flags, JSON keys and error behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main


def _llmc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=600)


def test_compile_run_golden(stories_hf: Path, stories_expected_ids: list[int], tmp_path: Path) -> None:
    out = tmp_path / "art"
    done = _llmc("compile", str(stories_hf), "-o", str(out))
    assert done.returncode == 0, done.stderr
    done = _llmc("run", str(out), "--prompt-ids", "1", "--max-tokens", "200", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) >= {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings"}
    assert data["prompt_token_ids"] == [1]
    assert data["token_ids"] == stories_expected_ids
    assert data["finish_reason"] == "length"


def test_user_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no such file" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["run", str(tmp_path), "--prompt-ids", "1"])
    assert result.exit_code == 2 and "not an llmc artifact" in result.output


def test_run_rejects_prompt_over_context(stories_artifact: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(stories_artifact), "--prompt-ids", "1 2 3", "--max-tokens", "600"])
    assert result.exit_code == 2
    assert "exceeds the context of 512 tokens" in result.output


def test_eval_and_inspect(stories_artifact: Path, stories_expected_ids: list[int], tmp_path: Path) -> None:
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([1, *stories_expected_ids]))
    result = CliRunner().invoke(main, ["eval", str(stories_artifact), "--ids-file", str(ids_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["tokens"] == 200
    # greedy text is the model's own argmax: its perplexity is low but above 1
    assert 1.0 < data["perplexity"] < 3.0
    result = CliRunner().invoke(main, ["inspect", str(stories_artifact)])
    assert result.exit_code == 0, result.output
    assert "ops prefill" in result.output and "target       torch" in result.output
    result = CliRunner().invoke(main, ["inspect", str(stories_artifact), "--json"])
    assert json.loads(result.output)["op_counts"]["decode"]


@pytest.mark.parametrize("args", [["--prompt", "hi"], ["--prompt-ids", "1 x"], []])
def test_run_argument_errors(stories_artifact: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["run", str(stories_artifact), *args])
    assert result.exit_code == 2
