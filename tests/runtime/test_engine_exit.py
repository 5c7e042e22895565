"""A script that never closes its engine, or is interrupted by Ctrl-C mid-generation, exits
cleanly (issue 19, item 10): before the engine closed itself at exit, the interpreter could stop
the engine's daemon thread inside a torch call, and the process died of SIGABRT (``terminate
called without an active exception``, exit status 134) after printing correct results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.sampling import SamplingParams
from tests.signals import default_sigint

PROMPT = "Once upon a time"
GREEDY = {"temperature": 0, "ignore_eos": True}

SCRIPT = """
import json, sys
from llmc.runtime.engine import Engine
from llmc.runtime.sampling import SamplingParams

eng = Engine.load(sys.argv[1])  # never closed
out = eng.generate([sys.argv[2]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
print(json.dumps(out.token_ids), flush=True)
if sys.argv[3] != "plain":
    print("generating", flush=True)
    long = SamplingParams(max_tokens=120000, temperature=0, ignore_eos=True)  # minutes: surely still running
    try:
        eng.generate(["Tell me a long story"], long)
        print("finished without interruption", flush=True)
    except KeyboardInterrupt:
        if sys.argv[3] != "interrupt-caught":
            raise
        print("interrupted", flush=True)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("exit") / "no_close.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def expected(chat_model: tuple[Path, Path]) -> list[int]:
    model = load_model(chat_model[1])
    assert model.tokenizer is not None
    return generate_ids(model, model.tokenizer.encode(PROMPT), SamplingParams(max_tokens=8, **GREEDY)).token_ids


def _start(script: Path, artifact: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), str(artifact), PROMPT, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=default_sigint)


def test_a_script_that_never_closes_its_engine_exits_cleanly(script: Path, chat_model: tuple[Path, Path],
                                                             expected: list[int]) -> None:
    for _ in range(3):  # the abort was a race with the engine thread (about one exit in two)
        proc = _start(script, chat_model[1], "plain")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "terminate called" not in err
        assert json.loads(out.splitlines()[0]) == expected


@pytest.mark.parametrize("mode", ["interrupt-caught", "interrupt"])
def test_ctrl_c_mid_generation_exits_cleanly(script: Path, long_chat_model: tuple[Path, Path], mode: str) -> None:
    proc = _start(script, long_chat_model[1], mode)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert proc.stdout.readline().strip() == "generating"
    time.sleep(0.5)  # well inside the 120000-token generation
    proc.send_signal(signal.SIGINT)
    try:
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave a 120000-token generation running
    assert len(json.loads(first)) == 8
    assert "terminate called" not in err
    assert "finished without interruption" not in rest
    if mode == "interrupt-caught":
        assert proc.returncode == 0, err
        assert rest.strip() == "interrupted"
    else:  # an uncaught KeyboardInterrupt ends the process by SIGINT, as Python always does
        assert proc.returncode == -signal.SIGINT, err
        assert "KeyboardInterrupt" in err
