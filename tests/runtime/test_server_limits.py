"""What one client may cost the server (issue 19, items 3 and 4), in-process: the body limit (413),
the body timeout (408), requests being read and tokenized at once (503), a prompt too long for the
context refused before the tokenizer runs, and text that is not valid Unicode (400, not 500)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

import anyio
import httpx
from fastapi.testclient import TestClient

from llmc.compiler.errors import LlmcError
from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.server import create_app
from llmc.runtime.server.limits import AdmissionGate, ServerLimits
from tests.models import CHATML_TEMPLATE, byte_level_tokenizer
from tests.runtime.fakes import FakeExecutor

VOCAB = 99
CONTEXT = 128


@pytest.fixture
def tokenizer() -> LlmcTokenizer:
    meta = TokenizerMeta(bos_token_id=0, eos_token_ids=[2], bos_token="<s>", eos_token="<|im_end|>",
                         chat_template=CHATML_TEMPLATE)
    return LlmcTokenizer(byte_level_tokenizer(VOCAB, printable_only=True), meta)


def _engine(tokenizer: LlmcTokenizer, delay: float = 0.0) -> Engine:
    return Engine(FakeExecutor(vocab=VOCAB, max_position=CONTEXT, delay=delay), tokenizer, EngineConfig(max_running=4))


@pytest.fixture
def engine(tokenizer: LlmcTokenizer) -> Iterator[Engine]:
    with _engine(tokenizer) as eng:
        yield eng


LIMITS = ServerLimits(max_request_bytes=64 * 1024, body_timeout=2.0)


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, model_name="fake", limits=LIMITS), raise_server_exceptions=False) as c:
        yield c


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


# the body limit


def test_a_body_over_the_limit_is_413_before_it_is_parsed(client: TestClient) -> None:
    body = json.dumps({"model": "fake", "prompt": "a" * (LIMITS.max_request_bytes + 10)})
    error = _error(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}),
                   413, "request_too_large")
    assert f"limit of {LIMITS.max_request_bytes} bytes" in error["message"]
    assert "--max-request-bytes" in error["message"]
    # not JSON at all, but too large: still 413 (the body is never parsed)
    too_large = b"x" * (LIMITS.max_request_bytes + 1)
    _error(client.post("/v1/chat/completions", content=too_large), 413, "request_too_large")
    ok = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while the body is read
        yield b'{"model": "fake", "prompt": "'
        for _ in range(LIMITS.max_request_bytes // 1000 + 2):
            yield b"a" * 1000
        yield b'"}'

    _error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
           413, "request_too_large")


def test_a_body_just_under_the_limit_is_read(client: TestClient) -> None:
    body = {"model": "fake", "prompt": "", "max_tokens": 2}
    body["prompt"] = "a" * (LIMITS.max_request_bytes - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == LIMITS.max_request_bytes
    # read whole and parsed: refused for its length (the context), not its size
    _error(client.post("/v1/completions", content=raw, headers={"content-type": "application/json"}),
           400, "context_length_exceeded")


def test_get_requests_and_metrics_pass_untouched(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    client.post("/v1/completions", content=b"x" * (LIMITS.max_request_bytes + 1))
    assert 'llmc_http_requests_total{endpoint="/v1/completions",status="413"} 1.0' in client.get("/metrics").text


def test_server_limits_are_checked() -> None:
    for bad in ({"max_request_bytes": 0}, {"max_pending": -1}, {"max_tokenizing": True}, {"header_timeout": 0},
                {"body_timeout": float("nan")}, {"keep_alive_timeout": float("inf")}, {"max_pending": 1.5}):
        with pytest.raises(LlmcError, match=next(iter(bad))):
            ServerLimits(**bad)


# a prompt that cannot fit is refused before the tokenizer runs


@pytest.fixture
def no_tokenizing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tokenizer ran on a prompt that the length bound refuses")

    monkeypatch.setattr(engine.tokenizer, "encode_batch", refuse)
    monkeypatch.setattr(engine.tokenizer, "encode", refuse)


def test_a_long_text_prompt_is_refused_without_tokenizing(client: TestClient, no_tokenizing: None,
                                                          engine: Engine) -> None:
    prompt = "the quick brown fox " * 3000  # 60 KB, far over 128 tokens
    error = _error(client.post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 4}),
                   400, "context_length_exceeded")
    assert error["param"] == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"] and "60000 bytes" in error["message"]
    error = _error(client.post("/v1/completions", json={"model": "fake", "prompt": ["ok", prompt]}), 400,
                   "context_length_exceeded")
    assert engine.stats()["kv_used_blocks"] == 0


def test_a_long_chat_message_is_refused_without_tokenizing(client: TestClient, no_tokenizing: None) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello there " * 5000}], "max_tokens": 4}
    error = _error(client.post("/v1/chat/completions", json=body), 400, "context_length_exceeded")
    assert error["param"] == "messages"


def test_prompts_that_fit_are_not_refused_by_the_bound(client: TestClient) -> None:
    # the bound is a lower bound: a prompt near the context (one token per byte here) still runs
    prompt = "a" * (CONTEXT - 1 - 4 - 1)  # BOS + prompt + 4 new tokens = context - 1
    r = client.post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    # over by one token: the tokenizer's count decides (the engine's refusal), with the same code
    _error(client.post("/v1/completions", json={"model": "fake", "prompt": prompt + "aa", "max_tokens": 4}), 400,
           "context_length_exceeded")


def test_a_long_token_id_prompt_is_refused_by_its_count(client: TestClient, no_tokenizing: None,
                                                        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.tokenizer, "decode", lambda *a, **k: pytest.fail("decoded a refused prompt"))
    body = {"model": "fake", "prompt": [5] * 5000, "max_tokens": 4, "echo": True}
    error = _error(client.post("/v1/completions", json=body), 400, "context_length_exceeded")
    assert "5000" in error["message"]


# text that is not valid Unicode


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", '{"model": "fake", "prompt": "ab\\ud800cd"}', "prompt"),
    ("/v1/completions", '{"model": "fake", "prompt": ["ok", "\\udcff"]}', "prompt.1"),
    ("/v1/completions", '{"model": "fake", "prompt": "ok", "stop": ["\\ud83d"]}', "stop.0"),
    ("/v1/completions", '{"model": "fake\\udfff", "prompt": "ok"}', "model"),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "\\udc80"}]}]}', "messages.0.content.0.text"),
    ("/v1/chat/completions", '{"model": "fake", "messages": [{"role": "user", "content": "hi"}], '
                             '"user": "\\ud800"}', "user"),
])
def test_lone_surrogates_are_400_naming_the_field(client: TestClient, engine: Engine, path: str, body: str,
                                                  param: str) -> None:
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    error = _error(r, 400, "invalid_unicode")
    assert error["param"] == param and "not valid Unicode" in error["message"] and "lone surrogate" in error["message"]
    assert engine.stats()["kv_used_blocks"] == 0
    assert client.post("/v1/completions", json={"model": "fake", "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_a_surrogate_in_a_field_name_is_400(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b'{"model": "fake", "prompt": "ok", "\\ud800": 1}',
                    headers={"content-type": "application/json"})
    assert "a field name is not valid Unicode" in _error(r, 400, "invalid_unicode")["message"]


def test_surrogate_pairs_are_valid_unicode(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b'{"model": "fake", "prompt": "ok \\ud83d\\ude00", "max_tokens": 1}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text  # an emoji spelled as a JSON surrogate pair


# time and work in flight (ASGI in-process, with bodies that trickle)


async def _trickle(parts: list[bytes], pause: float) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(pause)


def _run(engine: Engine, limits: ServerLimits, scenario: Any) -> Any:
    app = create_app(engine, model_name="fake", limits=limits)

    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://llmc", timeout=30) as c:
            return await scenario(c)

    return asyncio.run(main())


def test_a_body_that_does_not_arrive_in_time_is_408(engine: Engine) -> None:
    limits = ServerLimits(body_timeout=0.3)

    async def scenario(c: httpx.AsyncClient) -> httpx.Response:
        parts = [b'{"model": "fake", ', b'"prompt": "abc", ', b'"max_tokens": 1}']
        return await c.post("/v1/completions", content=_trickle(parts, 0.25))

    start = time.monotonic()
    error = _error(_run(engine, limits, scenario), 408, "request_timeout")
    assert "within 0.3 s" in error["message"] and time.monotonic() - start < 5


def test_requests_past_max_pending_wait_then_get_503(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = ServerLimits(max_pending=1, body_timeout=0.5)
    encode_batch = engine.tokenizer.encode_batch

    def slow_encode_batch(texts: list[str], *args: Any, **kwargs: Any) -> list[list[int]]:
        if texts == ["slow"]:
            time.sleep(1.5)  # a request being tokenized holds its slot
        return encode_batch(texts, *args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "encode_batch", slow_encode_batch)

    async def scenario(c: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        slow = asyncio.create_task(c.post("/v1/completions", json={"model": "fake", "prompt": "slow",
                                                                   "max_tokens": 1}))
        await asyncio.sleep(0.2)
        busy = await c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
        done = await slow
        after = await c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
        return done, busy, after

    start = time.monotonic()
    slow, busy, after = _run(engine, limits, scenario)
    assert slow.status_code == 200 and after.status_code == 200, (slow.text, after.text)
    error = _error(busy, 503, "server_busy")
    assert busy.headers["retry-after"] == "1"
    assert "its 1 slots for requests being read and tokenized" in error["message"]
    assert time.monotonic() - start < 10


def test_a_request_frees_its_slot_once_it_reaches_the_engine(tokenizer: LlmcTokenizer) -> None:
    limits = ServerLimits(max_pending=1, body_timeout=0.3)

    async def scenario(c: httpx.AsyncClient) -> tuple[httpx.Response, list[httpx.Response]]:
        long = asyncio.create_task(c.post("/v1/completions", json={"model": "fake", "prompt": "abc",
                                                                   "max_tokens": 30, "ignore_eos": True}))
        await asyncio.sleep(0.3)  # generating now, for about 30 * 0.03 s
        quick = [await c.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1})
                 for _ in range(3)]
        return await long, quick

    with _engine(tokenizer, delay=0.03) as engine:
        long, quick = _run(engine, limits, scenario)
    assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 30
    assert [r.status_code for r in quick] == [200, 200, 200]


def test_the_admission_gate() -> None:
    async def main() -> None:
        gate = AdmissionGate(2)
        first, second = await gate.enter(1.0), await gate.enter(1.0)
        assert first is not None and second is not None and gate.pending == 2
        assert await gate.enter(0.05) is None  # full: no slot within the timeout
        first.release()
        first.release()  # once only
        assert gate.pending == 1
        third = await gate.enter(0.05)
        assert third is not None and gate.pending == 2
        second.release()
        third.release()
        assert gate.pending == 0

    anyio.run(main)
