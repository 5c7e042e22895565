"""Helpers for the server tests: a tiny chat model artifact and a real ``llmc serve`` process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.models import byte_level_tokenizer, write_byte_level_tokenizer, write_random_hf_model

API_KEY = "test-key-123"
MODEL = "tiny-chat"
VOCAB = 99  # the printable byte-level tokenizer: every sampled id decodes to readable text


def build_chat_model(root: Path, context: int = 4096, seed: int = 3) -> tuple[Path, Path]:
    """A random Llama with a byte-level tokenizer and a ChatML template; returns (hf folder, artifact)."""
    from llmc.driver import CompileOptions, compile_model

    assert byte_level_tokenizer(VOCAB, printable_only=True).get_vocab_size() == VOCAB
    hf = root / "hf"
    hf.mkdir(parents=True)
    write_random_hf_model(hf, seed=seed, vocab_size=VOCAB, max_position_embeddings=context)
    write_byte_level_tokenizer(hf, VOCAB, printable_only=True)
    return hf, compile_model(hf, root / "artifact", CompileOptions())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``llmc serve`` in a subprocess on 127.0.0.1 and a free port; a context manager that always
    stops it."""

    def __init__(self, artifact: Path, *args: str, log: Path, startup_timeout: float = 120.0) -> None:
        self.artifact = artifact
        self.args = list(args)
        self.log = log
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        for _ in range(3):  # another process may grab the free port first
            self.port = free_port()
            cmd = [sys.executable, "-m", "llmc.cli", "serve", str(self.artifact), "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", *self.args]
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if self._wait_healthy():
                return self
            self.stop()
        raise RuntimeError(f"llmc serve did not start; log:\n{self.log.read_text()[-4000:]}")

    def _wait_healthy(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels); parsed with prometheus_client."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: Any) -> float:
    """One sample's value (0 when absent, as for a counter never incremented)."""
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    return samples.get(key, 0.0)
