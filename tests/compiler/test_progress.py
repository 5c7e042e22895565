"""Progress steps: silent without a reporter, nested, counted, per thread."""

from __future__ import annotations

import threading

from llmc.compiler.progress import Step, message, reporting, step


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, int]] = []

    def begin(self, s: Step) -> None:
        self.events.append(("begin", s.name, s.depth, s.done))

    def update(self, s: Step) -> None:
        self.events.append(("update", s.item or "", s.depth, s.done))

    def end(self, s: Step, failed: bool) -> None:
        self.events.append(("failed" if failed else "end", s.name, s.depth, s.done))

    def message(self, text: str) -> None:
        self.events.append(("message", text, 0, 0))


def test_steps_nest_and_count() -> None:
    rec = Recorder()
    with reporting(rec), step("outer"):
        message("note")
        with step("inner", total=2) as s:
            s.advance("a")
            s.advance("b")
    assert rec.events == [("begin", "outer", 0, 0), ("message", "note", 0, 0), ("begin", "inner", 1, 0),
                          ("update", "a", 1, 1), ("update", "b", 1, 2), ("end", "inner", 1, 2), ("end", "outer", 0, 0)]


def test_nothing_is_reported_without_a_reporter_or_from_other_threads() -> None:
    with step("quiet", total=1) as s:
        s.advance("x")  # no reporter: no error, nothing shown
    rec = Recorder()
    with reporting(rec):
        worker = threading.Thread(target=lambda: step("elsewhere").__enter__())
        worker.start()
        worker.join()
    assert rec.events == []


def test_a_failing_step_is_reported_as_failed() -> None:
    rec = Recorder()
    with reporting(rec):
        try:
            with step("doomed"):
                raise ValueError("x")
        except ValueError:
            pass
        with step("next"):
            pass
    assert rec.events[1] == ("failed", "doomed", 0, 0) and rec.events[2] == ("begin", "next", 0, 0)
