"""``llmc`` in a subprocess on a pseudo-terminal: what a person at a terminal sees and types."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

from tests.signals import default_sigint


class Terminal:
    """``python -m llmc.cli ARGS`` with a pseudo-terminal as its stdin, stdout, stderr and
    controlling terminal (so Ctrl-C, ``\\x03``, is a SIGINT from the terminal, as for a person)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become llmc
            try:
                default_sigint()
                os.execve(sys.executable, [sys.executable, "-m", "llmc.cli", *args], {**os.environ, **(env or {})})
            finally:
                os._exit(127)
        self.output = b""
        self.reads: list[tuple[float, bytes]] = []
        self.status: int | None = None

    def _read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.reads.append((time.monotonic(), data))
        self.output += data
        return True

    def expect(self, pattern: str, timeout: float = 120.0, start: int = 0) -> re.Match[bytes]:
        """Read until ``pattern`` (a regex) appears in the output after offset ``start``."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.output, start)
            if found:
                return found
            if time.monotonic() > deadline or not self._read_some(min(0.2, max(0.0, deadline - time.monotonic()))):
                if found := regex.search(self.output, start):
                    return found
                raise AssertionError(f"{pattern!r} did not appear; the terminal shows:\n"
                                     f"{self.output[start:].decode(errors='replace')}")

    def send(self, data: str | bytes) -> None:
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def send_until(self, data: bytes, pattern: str | None = None, start: int = 0, attempts: int = 10,
                   every: float = 1.5) -> int:
        """Send a control key until ``pattern`` appears after ``start`` (or, without one, until llmc exits);
        returns the match's end (or the exit status).

        A key typed while the program is between two reads of the terminal (readline not yet
        waiting, loaded machine) can be swallowed when readline switches the terminal's mode; a
        person would press it again, and so does this.
        """
        for _ in range(attempts):
            self.send(data)
            if pattern is None:
                deadline = time.monotonic() + every
                while time.monotonic() < deadline:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid:
                        self.status = os.waitstatus_to_exitcode(status)
                        return self.status
                    self._read_some(0.1)
            else:
                try:
                    return self.expect(pattern, timeout=every, start=start).end()
                except AssertionError:
                    pass
        target = "llmc to exit" if pattern is None else repr(pattern)
        raise AssertionError(f"{data!r} sent {attempts} times, no {target}; the terminal shows:\n"
                             f"{self.output[start:].decode(errors='replace')}")

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status, reading the output until the child is gone."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while select.select([self.fd], [], [], 0.05)[0] and self._read_some(0):
                    pass
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            self._read_some(0.1)
        raise AssertionError(f"llmc did not exit; the terminal shows:\n{self.output.decode(errors='replace')}")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(self.fd)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
