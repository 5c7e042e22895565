"""``llmc serve`` in a subprocess for the HTTP benchmarks (scaleout_load, server_memory, server_soak):
a free port, the wait for ``/health``, and a stop that always happens."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def llmc_server(artifact: str, args: list[str], log: Path | None = None,
                timeout: float = 300.0) -> Iterator[RunningServer]:
    """``llmc serve ARTIFACT --port P --log-level warning ARGS``, healthy, until the block ends; its
    output goes to ``log`` (appended; a temporary file if None), quoted when it fails to start."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmc.cli", "serve", artifact, "--port", str(port), "--log-level", "warning", *args]
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llmc serve exited; log:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llmc serve did not become healthy; log:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield RunningServer(f"http://127.0.0.1:{port}", port, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
