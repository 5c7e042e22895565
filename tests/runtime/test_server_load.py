"""``llmc serve`` under concurrent load, client disconnects and overload (a real server process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'llmc-toolchain[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from tests.runtime.serving import MODEL, ServerProcess, metric  # noqa: E402

CONTEXT = 4096  # the chat_model fixture's context
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def artifact(chat_model: tuple[Path, Path]) -> Path:
    return chat_model[1]


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-load-log") / "server.log"
    with ServerProcess(artifact, "--served-model-name", MODEL, "--max-running", "32", "--max-queue", "256",
                       log=log) as proc:
        yield proc


def _wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict:
    """Poll /metrics until nothing runs, nothing waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (metric(m, "llmc_num_requests_running"), metric(m, "llmc_num_requests_waiting"),
                metric(m, "llmc_kv_cache_used_blocks"))
        if idle == (0, 0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_100_concurrent_streams_complete(server: ServerProcess) -> None:
    n_requests, max_tokens = 100, 8

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Request number {i}"}], max_tokens=max_tokens,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        text, finish, tokens = "", None, -1
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def main() -> list[tuple[str, str | None, int]]:
        limits = httpx.Limits(max_connections=n_requests)
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120,
                                      http_client=openai.DefaultAsyncHttpxClient(limits=limits)) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n_requests))), 240)

    before = server.metrics()
    results = asyncio.run(main())
    assert len(results) == n_requests
    assert all(finish == "length" and tokens == max_tokens for _, finish, tokens in results)
    after = _wait_idle(server)
    ok = (metric(after, "llmc_http_requests_total", endpoint="/v1/chat/completions", status="200")
          - metric(before, "llmc_http_requests_total", endpoint="/v1/chat/completions", status="200"))
    assert ok == n_requests
    assert metric(after, "llmc_generation_tokens_total") - metric(before, "llmc_generation_tokens_total") == 800
    assert metric(after, "llmc_kv_cache_used_blocks") == 0


def test_disconnecting_clients_free_their_blocks(server: ServerProcess) -> None:
    max_tokens = CONTEXT - 64
    before = _wait_idle(server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(10):  # a few tokens arrive, then the client goes away
            next(lines)
        busy = server.metrics()
        assert metric(busy, "llmc_num_requests_running") == 1
        assert metric(busy, "llmc_kv_cache_used_blocks") > 0
    # a non-streaming request whose client gives up (read timeout) is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    after = _wait_idle(server)
    assert metric(after, "llmc_num_requests_running") == 0
    assert metric(after, "llmc_kv_cache_used_blocks") == 0
    assert metric(after, "llmc_sequences_aborted_total") - metric(before, "llmc_sequences_aborted_total") == 2
    generated = metric(after, "llmc_generation_tokens_total") - metric(before, "llmc_generation_tokens_total")
    assert generated < 2 * max_tokens  # neither ran to the end
    finished = sum(v for (name, _), v in after.items() if name == "llmc_sequences_finished_total")
    assert finished == sum(v for (name, _), v in before.items() if name == "llmc_sequences_finished_total")


def test_overload_beyond_the_queue_is_429(artifact: Path, tmp_path: Path) -> None:
    with ServerProcess(artifact, "--served-model-name", MODEL, "--max-running", "1", "--max-queue", "2",
                       log=tmp_path / "server.log") as small:

        async def one(client: openai.AsyncOpenAI) -> str:
            out = await client.completions.create(model=MODEL, prompt="x", max_tokens=300, temperature=0,
                                                  extra_body={"ignore_eos": True})
            return out.choices[0].finish_reason

        async def main() -> list[object]:
            async with openai.AsyncOpenAI(base_url=f"{small.url}/v1", api_key="unused", max_retries=0,
                                          timeout=120) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(6)),
                                                             return_exceptions=True), 120)

        results = asyncio.run(main())
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert refused and all(r == "length" or isinstance(r, openai.RateLimitError) for r in results), results
        assert 1 <= results.count("length") <= 5
        assert refused[0].code == "server_overloaded"
        assert refused[0].response.headers.get("retry-after") == "1"
        assert metric(small.metrics(), "llmc_http_requests_total", endpoint="/v1/completions",
                      status="429") == len(refused)
