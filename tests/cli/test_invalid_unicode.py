"""Text that is not valid Unicode (a lone surrogate: bytes that are not UTF-8 in an argument or on
stdin, or a JSON escape in a prompts file) ends in one ``error:`` line naming where it came from,
never a traceback (issue 19, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BAD_ARG = os.fsdecode(b"caf\xff!")  # how Python reads the byte 0xFF from argv: U+DCFF


def _llmc(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], input=stdin, capture_output=True, timeout=300,
                          env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:surrogateescape"})


def _one_error_line(result: subprocess.CompletedProcess[bytes], *expected: str) -> None:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: "), line
    for part in expected:
        assert part in line, line


@pytest.fixture(scope="module")
def artifact(chat_model: tuple[Path, Path]) -> str:
    return str(chat_model[1])


def test_run_prompt_and_system(artifact: str) -> None:
    _one_error_line(_llmc("run", artifact, "--prompt", BAD_ARG, "--max-tokens", "1"),
                    "--prompt is not valid Unicode", "U+DCFF, at character 3", "the byte 0xFF")
    _one_error_line(_llmc("run", artifact, "--chat", "--prompt", "hi", "--system", BAD_ARG, "--max-tokens", "1"),
                    "--system is not valid Unicode")
    _one_error_line(_llmc("run", artifact, "--chat", "--prompt", BAD_ARG, "--max-tokens", "1"),
                    "--prompt is not valid Unicode", "at character 3")  # the user's text, not the template's


def test_run_prompt_from_stdin(artifact: str) -> None:
    _one_error_line(_llmc("run", artifact, "--prompt", "-", "--max-tokens", "1", stdin=b"caf\xff!\n"),
                    "the prompt read from stdin is not valid Unicode")


def test_run_prompts_file(artifact: str, tmp_path: Path) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_bytes(b"fine\ncaf\xff!\n")
    _one_error_line(_llmc("run", artifact, "--prompts-file", str(lines), "--max-tokens", "1"),
                    f"{lines}:2: not UTF-8 text (the byte 0xFF at offset 8)")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": "a\\ud800b"}\n')
    _one_error_line(_llmc("run", artifact, "--prompts-file", str(jsonl), "--max-tokens", "1"),
                    f'{jsonl}:2: "prompt" is not valid Unicode', "U+D800, at character 1")


def test_tokenize(artifact: str) -> None:
    _one_error_line(_llmc("tokenize", artifact, "--text", BAD_ARG), "--text is not valid Unicode")


def test_chat_reports_the_message_and_goes_on(artifact: str) -> None:
    result = _llmc("chat", artifact, "--max-tokens", "2", stdin=b"caf\xff!\nhello\n")
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0 and "Traceback" not in err, err
    assert "(the message is not valid Unicode: it holds a lone surrogate, U+DCFF, at character 3" in err
    assert result.stdout.strip(), "the next message was not answered"


def test_chat_system_prompt(artifact: str) -> None:
    _one_error_line(_llmc("chat", artifact, "--system", BAD_ARG, stdin=b"hello\n"),
                    "the system prompt is not valid Unicode")
