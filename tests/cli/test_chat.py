"""``llmc chat`` on a terminal (a pseudo-terminal) and through pipes, and ``ChatSession``'s history."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.terminal import Terminal
from tests.signals import default_sigint

PROMPT = r"\n>>> "


def _answer_reads(term: Terminal, since: float, until: float) -> int:
    """How many separate reads brought output between two moments."""
    return sum(1 for t, _ in term.reads if since < t <= until)


def test_chat_on_a_terminal_streams_answers_resets_and_exits(chat_model: tuple[Path, Path]) -> None:
    _, artifact = chat_model
    with Terminal("chat", str(artifact), "--max-tokens", "300", "--ignore-eos", "--temperature", "0") as term:
        term.expect(r"chatting with artifact \(context 4096 tokens\); /reset")
        at = term.expect(PROMPT).end()
        term.send("hello\n")
        sent = time.monotonic()
        done = term.expect(PROMPT, start=at)
        answer = term.output[at:done.start()].decode(errors="replace")
        assert "hello" in answer and len(answer) > 200  # the echo, then 300 tokens (a few decode to nothing)
        assert "answer reached --max-tokens 300" in answer
        assert _answer_reads(term, sent, time.monotonic()) >= 3  # it came in pieces, not at the end
        term.send("/reset\n")
        at = term.expect(r"\(conversation cleared\)", start=done.end()).end()
        at = term.expect(PROMPT, start=at).end()
        term.send("/nonsense\n")
        at = term.expect(r"unknown command /nonsense", start=at).end()
        term.send("/exit\n")
        assert term.wait() == 0


LONG_ANSWER = "120000"  # tokens: minutes of generation, so the answer is surely running when Ctrl-C comes


def test_ctrl_c_on_a_terminal_stops_the_answer_not_the_chat(long_chat_model: tuple[Path, Path]) -> None:
    _, artifact = long_chat_model
    with Terminal("chat", str(artifact), "--max-tokens", LONG_ANSWER, "--ignore-eos", "--temperature", "0") as term:
        at = term.expect(PROMPT).end()
        term.send("tell me everything\n")
        term.expect(r"tell me everything\r?\n.{40}", start=at)  # the answer has begun
        term.send(b"\x03")  # Ctrl-C
        stopped = term.expect(r"\(stopped; this answer is not kept\)", start=at, timeout=30)
        at = term.expect(PROMPT, start=stopped.end(), timeout=30).end()
        at = term.send_until(b"\x03", r"/exit or Ctrl-D leaves", start=at)  # Ctrl-C at the prompt does not leave
        assert term.send_until(b"\x04") == 0  # Ctrl-D does


def _llmc(*args: str, stdin: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_chat_through_a_pipe_answers_each_line(chat_model: tuple[Path, Path]) -> None:
    _, artifact = chat_model
    args = ("--max-tokens", "6", "--ignore-eos", "--temperature", "0")
    done = _llmc("chat", str(artifact), *args, stdin="hello\n\n/reset\nhello\n/exit\nnot read\n")
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # /reset: the same first turn again
    assert "(conversation cleared)" in done.stderr and ">>>" not in done.stdout
    single = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(artifact), "--chat", "--prompt", "hello",
                             *args], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    assert single.stdout.rstrip("\n") == answers[0]  # run --chat: the same template, the same answer


def test_ctrl_c_through_a_pipe_stops_the_answer(long_chat_model: tuple[Path, Path]) -> None:
    _, artifact = long_chat_model
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "chat", str(artifact), "--max-tokens", LONG_ANSWER,
                             "--ignore-eos", "--temperature", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has begun
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(b"/exit\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"(stopped; this answer is not kept)" in err


@pytest.mark.network
@pytest.mark.slow
def test_chat_pipe_answers_a_question_with_a_real_model(smollm2_gguf: Path, tmp_path: Path) -> None:
    done = _llmc("chat", str(smollm2_gguf), "--max-tokens", "24", "--temperature", "0",
                 stdin="Name the capital of France.\n", env={"LLMC_ARTIFACTS": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "compiling" in done.stderr  # the GGUF was compiled on first use


def test_chat_needs_a_chat_template(stories_artifact: Path) -> None:
    done = _llmc("chat", str(stories_artifact), stdin="hi\n")
    assert done.returncode == 2 and "cannot chat" in done.stderr and "llmc run" in done.stderr
