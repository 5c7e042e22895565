"""Showing progress to a person: :class:`ConsoleReporter` draws :mod:`llmc.compiler.progress` steps on stderr."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

from llmc.compiler.progress import Step

CLEAR_LINE = "\r\x1b[K"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class ConsoleReporter:
    """Steps on ``stream`` (stderr by default).

    Only steps that take ``min_seconds`` or more show. A terminal gets a live status line (the
    open steps, their counts and the time so far, redrawn a few times a second) and keeps one line
    per such step when it ends. Anything else (a pipe, a log file) gets those lines only, plus a
    line when an outermost step has run for ``min_seconds``.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, min_seconds: float = 1.0,
                 interval: float = 0.25) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.min_seconds = min_seconds
        self.interval = interval
        self._open: list[Step] = []
        self._lock = threading.Lock()
        self._drawn = 0.0
        self._announced: set[int] = set()
        self._ticker: threading.Thread | None = None

    # -- Reporter -----------------------------------------------------------------------------
    def begin(self, step: Step) -> None:
        with self._lock:
            self._open.append(step)
            self._draw(force=True)
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="llmc-progress", daemon=True)
            self._ticker.start()

    def update(self, step: Step) -> None:
        with self._lock:
            self._draw(force=False)

    def end(self, step: Step, failed: bool) -> None:
        with self._lock:
            if step in self._open:
                self._open.remove(step)
            elapsed = step.elapsed
            if not failed and elapsed >= self.min_seconds:
                self._announce()
                counted = f" ({step.done} of {step.total})" if step.total is not None else ""
                self._clear()
                self._write(f"{'  ' * step.depth}{step.name}{counted}: {_duration(elapsed)}\n")
            self._announced.discard(id(step))
            self._draw(force=True)

    def message(self, text: str) -> None:
        with self._lock:
            self._clear()
            self._write(text.rstrip("\n") + "\n")
            self._draw(force=True)

    # -- drawing ------------------------------------------------------------------------------
    def _tick(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self._open:
                    self._ticker = None
                    return
                if any(s.elapsed >= self.min_seconds for s in self._open):
                    self._announce()
                self._draw(force=True)

    def _announce(self) -> None:
        """Without a live line: say once that the outermost open step is under way."""
        if self.live or not self._open or id(self._open[0]) in self._announced:
            return
        self._announced.add(id(self._open[0]))
        self._write(f"{self._open[0].name} ...\n")

    def status_line(self) -> str:
        """The open steps, outermost first: ``compiling x › passes [3/9] fuse-qkv  4.2s``."""
        parts = []
        for s in self._open:
            part = s.name
            if s.total is not None:
                part += f" [{s.done}/{s.total}]"
            if s.item and s is self._open[-1]:
                part += f" {s.item}"
            parts.append(part)
        return " › ".join(parts) + f"  {_duration(self._open[0].elapsed)}"

    def _draw(self, force: bool) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < self.interval:
            return
        self._drawn = now
        if not self._open:
            self._clear()
            return
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        line = self.status_line()
        if len(line) > width:
            line = line[: width - 1] + "…"
        self._write(CLEAR_LINE + line)

    def _clear(self) -> None:
        if self.live:
            self._write(CLEAR_LINE)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth an error
            pass
