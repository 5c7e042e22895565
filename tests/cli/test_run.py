"""``llmc run`` on a GGUF file (compiled once into the artifact cache), stdin prompts, --chat,
--prompts-file output and the empty-answer hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main


def _llmc(*args: str, cache: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "LLMC_ARTIFACTS": str(cache)})


def test_run_a_gguf_twice_compiles_once(stories_gguf: Path, stories_expected_ids: list[int], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("run", str(stories_gguf), "--prompt-ids", "1", "--max-tokens", "40", "--temperature", "0", "--json")
    first = _llmc(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "compiling" in first.stderr and "later runs reuse it" in first.stderr
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert entry.name.startswith("stories260k-f32-native-torch-") and (entry / "manifest.json").is_file()
    stamp = (entry / "manifest.json").stat().st_mtime_ns
    second = _llmc(*args, cache=cache)
    assert second.returncode == 0, second.stderr
    assert "compiling" not in second.stderr  # the cache hit: no compile, no message
    assert (entry / "manifest.json").stat().st_mtime_ns == stamp
    assert json.loads(second.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]
    assert json.loads(second.stdout)["token_ids"] == stories_expected_ids[:40]
    listing = _llmc("cache", "ls", cache=cache)
    assert entry.name in listing.stdout and "torch --quant native" in listing.stdout
    assert str(stories_gguf) in listing.stdout
    assert _llmc("cache", "rm", entry.name, cache=cache).returncode == 0
    assert not entry.exists()


def test_other_options_make_another_build(stories_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMC_ARTIFACTS", str(tmp_path / "cache"))
    args = ["run", str(stories_hf), "--prompt-ids", "1", "--max-tokens", "3", "--temperature", "0"]
    for quant in ("none", "int8"):
        result = CliRunner().invoke(main, [*args, "--quant", quant])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert [n.rsplit("-", 2)[0] for n in names] == ["hf-int8", "hf-none"]
    result = CliRunner().invoke(main, ["cache", "rm", "--all"])
    assert result.exit_code == 0 and not (tmp_path / "cache").exists()


def test_model_argument_errors_say_what_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    for path, wanted in ((tmp_path / "empty", "not a Hugging Face model folder"),
                         (tmp_path / "notes.txt", "not an llmc artifact, a GGUF file or a Hugging Face model folder"),
                         (tmp_path / "missing", "no such file or directory")):
        result = CliRunner().invoke(main, ["run", str(path), "--prompt-ids", "1"])
        assert result.exit_code == 2 and wanted in result.output, result.output


def test_prompt_from_stdin_and_prompts_file_output(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    _, artifact = chat_model
    common = ["--max-tokens", "4", "--ignore-eos", "--temperature", "0"]
    direct = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "hello there", *common])
    piped = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "-", *common], input="hello there\n")
    assert direct.exit_code == 0 and piped.exit_code == 0, piped.output
    assert piped.output == direct.output
    empty = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "-"], input="\n")
    assert empty.exit_code == 2 and "empty prompt" in empty.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\nsecond prompt\n")
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompts-file", str(prompts), *common])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "[1/2] hello there" and "[2/2] second prompt" in lines
    assert lines[lines.index("[2/2] second prompt") - 1] == ""  # a blank line between answers
    assert direct.output.strip("\n") in result.output


def test_system_needs_chat(chat_model: tuple[Path, Path]) -> None:
    _, artifact = chat_model
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt", "hi", "--system", "be brief"])
    assert result.exit_code == 2 and "--system needs --chat" in result.output


@pytest.mark.network
@pytest.mark.slow
def test_an_instruct_model_without_its_template_gets_a_hint(smollm2_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = _llmc("run", str(smollm2_gguf), "--prompt", "What is the capital of France?", "--max-tokens", "24",
                  "--temperature", "0", cache=cache)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == ""  # SmolLM2-Instruct ends at once without its template
    assert "hint: the answer is empty" in plain.stderr and "--chat" in plain.stderr
    chat = _llmc("run", str(smollm2_gguf), "--chat", "--prompt", "Name the capital of France.", "--max-tokens", "24",
                 "--temperature", "0", cache=cache)
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout and "hint" not in chat.stderr
