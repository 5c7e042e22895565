"""Progress of the steps that can take more than a moment: a download, reading a model, each pass,
each tensor. Code doing such work reports through :func:`step`; nothing is shown unless whoever
drives it (the CLI, ``llmc.load(..., progress=True)``) installs a :class:`Reporter` with
:func:`reporting`::

    with step("reading model.gguf"):                   # one timed step
        ...
    with step("quantizing", total=len(names)) as s:    # counted units
        for name in names:
            ...
            s.advance(name)

Steps nest (a step begun inside another is its child). Reports come from the thread that
installed the reporter; other threads' steps are not shown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Step:
    """One step in progress: ``done`` of ``total`` units (None: not counted), the last unit's name."""

    name: str
    total: int | None = None
    depth: int = 0
    done: int = 0
    item: str | None = None
    started: float = field(default_factory=time.perf_counter)
    _reporter: Reporter | None = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, item: str | None = None, n: int = 1) -> None:
        """``n`` more units done; ``item`` names the last one."""
        self.done += n
        self.item = item
        if self._reporter is not None:
            self._reporter.update(self)


class Reporter(Protocol):
    """Shows steps (e.g. :class:`llmc.console.ConsoleReporter` on a terminal)."""

    def begin(self, step: Step) -> None: ...

    def update(self, step: Step) -> None: ...

    def end(self, step: Step, failed: bool) -> None: ...

    def message(self, text: str) -> None: ...


_reporter: Reporter | None = None
_owner: int | None = None
_depth = threading.local()


def _active() -> Reporter | None:
    return _reporter if _owner == threading.get_ident() else None


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the steps of this thread with ``reporter`` (None: show nothing) inside the block."""
    global _reporter, _owner
    saved = _reporter, _owner
    _reporter, _owner = reporter, threading.get_ident()
    try:
        yield
    finally:
        _reporter, _owner = saved


@contextmanager
def step(name: str, total: int | None = None) -> Iterator[Step]:
    """A step of work, timed and shown while it runs."""
    reporter = _active()
    depth = getattr(_depth, "value", 0)
    current = Step(name, total, depth, _reporter=reporter)
    if reporter is None:
        yield current
        return
    _depth.value = depth + 1
    reporter.begin(current)
    failed = True
    try:
        yield current
        failed = False
    finally:
        _depth.value = depth
        reporter.end(current, failed)


def message(text: str) -> None:
    """A one-line note for the person waiting (e.g. that a download starts and how big it is)."""
    reporter = _active()
    if reporter is not None:
        reporter.message(text)
