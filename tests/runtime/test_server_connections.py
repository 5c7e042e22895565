"""Connections to a real ``llmc serve`` cannot be held open for nothing (issue 19, item 3): a client
that sends nothing, trickles its headers, stalls its body or idles after a response is cut off; a
body declared larger than the limit gets 413 at once; a 21 MB prompt is refused fast."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from tests.runtime.serving import ServerProcess  # noqa: E402

HEADER_TIMEOUT = 0.6
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 0.6
MAX_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def server(chat_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT), "--keep-alive-timeout",
            str(KEEP_ALIVE), "--max-request-bytes", str(MAX_BYTES)]
    with ServerProcess(chat_model[1], *args, log=log) as proc:
        yield proc


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic()


def _read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_connection_that_sends_nothing_is_closed(server: ServerProcess) -> None:
    start = time.monotonic()
    with _connect(server) as sock:
        data, closed = _read_until_closed(sock)
    assert data == b"" and HEADER_TIMEOUT * 0.8 <= closed - start < HEADER_TIMEOUT + 3


def test_trickled_headers_are_cut_off(server: ServerProcess) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    start = time.monotonic()
    with _connect(server) as sock:
        try:
            for byte in request:  # one byte every 50 ms: each resets no timer
                sock.send(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - start > HEADER_TIMEOUT + 3:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed = _read_until_closed(sock)
    assert b"200 OK" not in data and closed - start < HEADER_TIMEOUT + 4


def test_a_stalled_body_is_408(server: ServerProcess) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 1}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    start = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(head + body[:5])  # and then nothing
        data, closed = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"request_timeout" in data and closed - start < BODY_TIMEOUT + 4


def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(server: ServerProcess) -> None:
    with _connect(server) as sock:
        for _ in range(3):  # requests back to back on one connection, each within the header timeout
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = _read_response(sock)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
            time.sleep(HEADER_TIMEOUT / 3)
        start = time.monotonic()
        data, closed = _read_until_closed(sock)
    assert data == b"" and closed - start < max(KEEP_ALIVE, HEADER_TIMEOUT) + 3


def test_a_body_declared_too_large_is_413_at_once(server: ServerProcess) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (10 * 2**30))  # 10 GiB announced, never sent
    start = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(head + b'{"prompt": "')
        data, closed = _read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"request_too_large" in data and closed - start < 3


def test_a_21_mb_prompt_is_refused_fast_and_the_server_stays_up(server: ServerProcess) -> None:
    prompt = "the quick brown fox jumps over the lazy dog " * 480_000  # 21 MB
    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
    # under the body limit but far over the context: refused by the length bound, without tokenizing
    prompt = "the quick brown fox jumps over the lazy dog " * 20_000  # 0.9 MB, 4096-token context
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "bytes long, at least" in r.json()["error"]["message"]
    assert time.monotonic() - start < 20
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
