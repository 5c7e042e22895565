"""Fuzz the HTTP API: structured mutations of valid completion and chat bodies (any field, any
value, deep inside; lone surrogates spelled as JSON escapes; token ids out of range) and of their
bytes (truncated, flipped, spliced, the wrong content type), sent to a real ``llmc serve`` running
under an address-space limit. Each case must end in a 2xx or a 4xx in OpenAI's error format with
a one-line message (never a 5xx, a hang or a dead server), within the per-case limit; at the end
the server is healthy, holds no KV blocks and has not grown without bound."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
psutil = pytest.importorskip("psutil", reason="psutil is not installed")

from tests.fuzz.sandbox import CASE_SECONDS  # noqa: E402
from tests.fuzz.strategies import EDGE_INTS, mutate_json  # noqa: E402
from tests.runtime.serving import ServerProcess  # noqa: E402

ADDRESS_SPACE = 8 << 30  # the server's RLIMIT_AS: llmc, torch and the engine's threads map about 2 GiB
MAX_REQUEST_BYTES = 256 * 1024
RSS_GROWTH_LIMIT = 1 << 30

BASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.7,
                         "top_p": 0.9, "seed": 1, "stop": ["\n"], "logprobs": 2}),
    ("/v1/completions", {"model": "tiny", "prompt": [[1, 5, 9], [7, 7]], "max_tokens": 2, "n": 2, "echo": True}),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2, "stream": True,
                         "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hi there"}],
                              "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "stop": "x"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}], "max_tokens": 2,
        "stream": True}),
]


@pytest.fixture(scope="module")
def server(chat_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz-http") / "server.log"
    args = ["--served-model-name", "tiny", "--max-request-bytes", str(MAX_REQUEST_BYTES), "--body-timeout", "10"]
    with ServerProcess(chat_model[1], *args, log=log, address_space=ADDRESS_SPACE) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=CASE_SECONDS) as client:
        yield client


@pytest.fixture(scope="module")
def rss_before(server: ServerProcess, http: httpx.Client) -> int:
    for path, body in BASES:  # warm up every path once, so that growth means growth
        http.post(path, json=body).read()
    assert server.proc is not None
    return int(psutil.Process(server.proc.pid).memory_info().rss)


_SURROGATES = ["\\ud800", "\\udfff", "\\udcff", "\\ud83d"]


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, str, str]:
    """(path, body bytes, content type, what was done)."""
    path, base = draw(st.sampled_from(BASES))
    spot: list[str] = []
    value: Any = mutate_json(draw, base, path=spot) if draw(st.integers(0, 4)) else base
    if draw(st.booleans()) and isinstance(value, dict) and "prompt" in value:  # token ids at the edges
        value = {**value, "prompt": [draw(st.sampled_from(EDGE_INTS)) for _ in range(draw(st.integers(0, 3)))]}
        spot.append(f"prompt ids {value['prompt']}")
    raw = json.dumps(value, allow_nan=True).encode()
    kind = draw(st.sampled_from(["json", "json", "surrogate", "truncate", "flip", "splice", "content-type"]))
    content_type = "application/json"
    if kind == "surrogate":  # a lone surrogate, as JSON spells it, inside some string
        strings = [m.start() + 1 for m in re.finditer(rb'"(?=[^"\\]*")', raw)]
        if strings:
            at = draw(st.sampled_from(strings))
            raw = raw[:at] + draw(st.sampled_from(_SURROGATES)).encode() + raw[at:]
    elif kind == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ (1 << draw(st.integers(0, 7)))]) + raw[at + 1:]
    elif kind == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff\xfe", b"\x00", b"[" * 200, b'{"a":' * 50, b"1e999",
                                               b"-0", b"\\u0000", b'"' * 3])) + raw[at:]
    elif kind == "content-type":
        content_type = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", ""]))
    return path, raw, content_type, f"{kind} {' / '.join(spot)}"[:400]


def _check_error(response: httpx.Response, what: str) -> None:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssertionError(f"{what}: {response.status_code} without an OpenAI error body: {response.text[:300]}") \
            from exc
    assert set(error) == {"message", "type", "param", "code"}, (what, error)
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"].strip(), \
        (what, error)
    assert "Traceback" not in error["message"], (what, error)


@given(case=bodies())
def test_http_bodies_end_in_a_clear_answer(http: httpx.Client, rss_before: int,
                                           case: tuple[str, bytes, str, str]) -> None:
    path, raw, content_type, what = case
    headers = {"content-type": content_type} if content_type else {}
    start = time.monotonic()
    with http.stream("POST", path, content=raw, headers=headers) as response:
        body = response.read()
    elapsed = time.monotonic() - start
    what = f"{path} {what}: {raw[:200]!r}"
    assert elapsed < CASE_SECONDS, f"{what}: {elapsed:.1f} s"
    assert response.status_code < 500, f"{what}: {response.status_code} {body[:400]!r}"
    if response.status_code >= 400:
        _check_error(response, what)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", (what, events[-3:])
        for event in events[:-1]:  # an error after the headers comes in-band; it must be a 4xx-class one
            payload = json.loads(event[len("data: "):])
            assert "error" not in payload or payload["error"].get("type") != "internal_server_error", (what, payload)


def test_the_server_survives_the_fuzzing(server: ServerProcess, http: httpx.Client, rss_before: int) -> None:
    """Runs after the cases above (same module, file order): healthy, no KV blocks held, bounded memory."""
    assert http.get("/health").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        used = server.metrics()[("llmc_kv_cache_used_blocks", ())]
        if used == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert used == 0, f"{used} KV blocks still held after every request ended"
    assert server.proc is not None
    growth = psutil.Process(server.proc.pid).memory_info().rss - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"the server grew by {growth / 2**20:.0f} MiB"
