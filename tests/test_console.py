"""The console reporter: lines for steps of a second or more; a live line on a terminal."""

from __future__ import annotations

import io
import time

from llmc.compiler.progress import reporting, step
from llmc.console import ConsoleReporter


def test_a_pipe_gets_one_line_per_long_step() -> None:
    out = io.StringIO()
    with reporting(ConsoleReporter(out, live=False, min_seconds=0.2, interval=0.05)):
        with step("quick"):
            pass
        with step("compiling m"):
            with step("passes", total=2) as s:
                time.sleep(0.25)
                s.advance("dce")
                s.advance("fuse")
            with step("tiny"):
                pass
    assert out.getvalue().splitlines() == ["compiling m ...", "  passes (2 of 2): 0.3s", "compiling m: 0.3s"]


def test_a_terminal_gets_a_live_status_line() -> None:
    out = io.StringIO()
    reporter = ConsoleReporter(out, live=True, min_seconds=10, interval=0.01)
    with reporting(reporter), step("compiling m"), step("passes", total=3) as s:
        s.advance("fuse-qkv")
        assert reporter.status_line().startswith("compiling m › passes [1/3] fuse-qkv  ")
        time.sleep(0.05)
    text = out.getvalue()
    assert "\r\x1b[Kcompiling m › passes [1/3] fuse-qkv" in text
    assert text.endswith("\r\x1b[K")  # the live line is cleared at the end; no step was long enough to keep
