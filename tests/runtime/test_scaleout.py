"""``llmc serve A B --replicas 2`` on a local Ray instance (one for the module), driven by the
official ``openai`` client: two tiny chat models, two engine replicas each.

The replica-kill test runs last: it changes the replica set the other tests look at.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'llmc-toolchain[ray]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'llmc-toolchain[dev]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
psutil = pytest.importorskip("psutil", reason="psutil is not installed (pip install 'llmc-toolchain[bench]')")

from llmc.runtime.generate import generate_ids  # noqa: E402
from llmc.runtime.loader import LoadedModel, load_model  # noqa: E402
from llmc.runtime.sampling import SamplingParams  # noqa: E402
from tests.runtime.serving import API_KEY, MODEL, ServerProcess, build_chat_model, metric  # noqa: E402

OTHER = "other-chat"
HEADER = "x-llmc-replica"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_chat_model(tmp_path_factory.mktemp("other_chat"), seed=11)


@pytest.fixture(scope="module")
def server(chat_model: tuple[Path, Path], other_model: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("scaleout-log") / "server.log"
    # 2 models x 2 replicas x 0.5 CPU: fits CI's 2 cores; one engine thread per replica
    with ServerProcess(chat_model[1], str(other_model[1]), "--served-model-name", MODEL, "--served-model-name", OTHER,
                       "--replicas", "2", "--cpus-per-replica", "0.5", "--threads", "1", "--api-key", API_KEY,
                       log=log, startup_timeout=300) as proc:
        _wait_replicas(proc, {MODEL: 2, OTHER: 2})
        yield proc


def _health(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def _wait_replicas(server: ServerProcess, counts: dict[str, int], timeout: float = 120.0,
                   other_than: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Poll /health until each model lists ``counts[model]`` replicas (and not the set ``other_than[model]``)."""
    deadline = time.monotonic() + timeout
    while True:
        body = _health(server)
        live = {m: body.get("models", {}).get(m, {}).get("replicas", []) for m in counts}
        if all(len(live[m]) == n and set(live[m]) != set((other_than or {}).get(m, ())) for m, n in counts.items()):
            return live
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas did not come up: {body}\n{server.log.read_text()[-3000:]}")
        time.sleep(0.5)


def _client(server: ServerProcess) -> openai.AsyncOpenAI:
    limits = httpx.Limits(max_connections=128)
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120,
                              http_client=openai.DefaultAsyncHttpxClient(limits=limits))


async def _chat(client: openai.AsyncOpenAI, model: str, content: str, max_tokens: int, stream: bool,
                **kwargs: object) -> tuple[str, str | None, int, str]:
    """(text, finish_reason, completion tokens, replica header) of one chat completion."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, stream=stream,
        extra_body=NO_EOS, **({"stream_options": {"include_usage": True}} if stream else {}), **kwargs)
    replica = raw.headers[HEADER]
    if not stream:
        out = raw.parse()
        return out.choices[0].message.content, out.choices[0].finish_reason, out.usage.completion_tokens, replica
    text, finish, tokens = "", None, -1
    async for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, finish, tokens, replica


def _sum(samples: dict, name: str, model: str, replicas: list[str]) -> float:
    return sum(metric(samples, name, model=model, replica=r) for r in replicas)


def test_two_replicas_answer_64_concurrent_openai_requests(server: ServerProcess) -> None:
    replicas = _wait_replicas(server, {MODEL: 2})[MODEL]
    before = server.metrics()
    n, max_tokens = 64, 8

    async def main() -> list[tuple[str, str | None, int, str]]:
        async with _client(server) as client:
            jobs = [_chat(client, MODEL, f"Request {i}: {'abcdefghij' * (i % 5)}", max_tokens, stream=i % 2 == 0,
                          seed=i, temperature=0.7) for i in range(n)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 240)

    results = asyncio.run(main())
    assert all(finish == "length" and tokens == max_tokens for _, finish, tokens, _ in results), results
    served = collections.Counter(replica for *_, replica in results)
    assert set(served) == set(replicas), (served, replicas)  # both replicas served, and only this model's
    # /metrics adds up every replica's series (each replica reports about once a second)
    deadline = time.monotonic() + 20
    while True:
        after = server.metrics()
        generated = (_sum(after, "llmc_generation_tokens_total", MODEL, replicas)
                     - _sum(before, "llmc_generation_tokens_total", MODEL, replicas))
        if generated == n * max_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert generated == n * max_tokens
    for r in replicas:
        assert metric(after, "llmc_generation_tokens_total", model=MODEL, replica=r) > 0
    ok = (metric(after, "llmc_http_requests_total", endpoint="/v1/chat/completions", status="200")
          - metric(before, "llmc_http_requests_total", endpoint="/v1/chat/completions", status="200"))
    assert ok == n


def test_prefix_affinity_sends_a_repeated_prefix_to_one_replica(server: ServerProcess) -> None:
    shared = "You are a careful assistant. " * 8  # 232 characters: far more than the 64-token threshold

    async def main() -> list[str]:
        async with _client(server) as client:
            await _chat(client, MODEL, shared + "first", 2, stream=False)  # places the prefix on one replica
            seen = []
            for i in range(8):
                seen.append((await _chat(client, MODEL, shared + f"question {i}", 2, stream=i % 2 == 1))[3])
            return seen

    seen = asyncio.run(main())
    assert len(set(seen)) == 1, seen
    holder = seen[0]
    deadline = time.monotonic() + 10
    while metric(server.metrics(), "llmc_prefix_cache_hit_rate", model=MODEL, replica=holder) == 0:
        assert time.monotonic() < deadline, "the replica holding the prefix reports no prefix-cache hits"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def references(chat_model: tuple[Path, Path], other_model: tuple[Path, Path]) -> dict[str, LoadedModel]:
    return {MODEL: load_model(str(chat_model[1])), OTHER: load_model(str(other_model[1]))}


def test_two_models_side_by_side_route_by_model(server: ServerProcess, references: dict[str, LoadedModel]) -> None:
    live = _wait_replicas(server, {MODEL: 2, OTHER: 2})
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list().data) == sorted([MODEL, OTHER])
    outputs = {}
    for name, ref in references.items():
        raw = client.completions.with_raw_response.create(model=name, prompt="Once upon a time", max_tokens=10,
                                                          temperature=0, extra_body=NO_EOS)
        out = raw.parse()
        assert out.model == name and raw.headers[HEADER] in live[name]
        ids = ref.tokenizer.encode("Once upon a time")
        greedy = generate_ids(ref, ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).token_ids
        assert out.choices[0].text == ref.tokenizer.decode(greedy)
        outputs[name] = out.choices[0].text
    assert outputs[MODEL] != outputs[OTHER]  # two different models really answered


def test_bad_requests_get_openai_4xx(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:  # refused by a replica's engine, mapped the same way
        client.completions.create(model=OTHER, prompt="x" * 100, max_tokens=5000)
    assert too_long.value.code == "context_length_exceeded"
    assert too_long.value.response.headers[HEADER] in _health(server)["models"][OTHER]["replicas"]
    with pytest.raises(openai.BadRequestError) as bad_regex:  # compiled on the replica, refused the same way
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_regex": "(unclosed"})
    assert (bad_regex.value.code, bad_regex.value.body["param"]) == ("invalid_constraint", "guided_regex")
    choice = client.completions.create(model=MODEL, prompt="x", max_tokens=8,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_mid_stream_cancels_its_generation_on_the_replica(server: ServerProcess) -> None:
    replicas = _wait_replicas(server, {MODEL: 2})[MODEL]
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 3000, "stream": True, **NO_EOS}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200 and r.headers[HEADER] in replicas
        next(r.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 20
    while True:
        after = server.metrics()
        aborted = (_sum(after, "llmc_sequences_aborted_total", MODEL, replicas)
                   - _sum(before, "llmc_sequences_aborted_total", MODEL, replicas))
        running = _sum(after, "llmc_num_requests_running", MODEL, replicas)
        if (aborted, running) == (1, 0):
            break
        assert time.monotonic() < deadline, f"the generation was not cancelled: aborted {aborted}, running {running}"
        time.sleep(0.5)


def _replica_pids() -> list[int]:
    """Worker processes of this module's engine replicas for MODEL (Ray names them after the deployment)."""
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:llmc:engine-{MODEL}" in cmdline:
            pids.append(p.pid)
    return pids


def test_killing_a_replica_mid_load_loses_no_request_silently_and_recovers(server: ServerProcess) -> None:
    before = _wait_replicas(server, {MODEL: 2})[MODEL]
    pids = _replica_pids()
    assert len(pids) == 2, pids
    n, max_tokens = 24, 300

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, object]:
        try:
            _, finish, tokens, _ = await _chat(client, MODEL, f"Load {i}", max_tokens, stream=i % 2 == 0)
        except openai.APIError as exc:  # an error event in the stream, or an error status
            return "error", str(exc)
        return "ok", (finish, tokens)

    async def main() -> list[tuple[str, object]]:
        async with _client(server) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
            await asyncio.sleep(1.0)  # every request admitted and generating
            os.kill(pids[0], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 180)  # nothing hangs

    results = asyncio.run(main())
    for i, (status, detail) in enumerate(results):
        if status == "ok":
            assert detail == ("length", max_tokens), (i, detail)  # complete, never silently truncated
        else:
            assert i % 2 == 0, f"non-streamed request {i} was not retried: {detail}"
            assert "replica" in str(detail) and "failed" in str(detail), detail
    assert sum(status == "ok" for status, _ in results) >= n // 2  # every non-streamed one and the other streams
    assert any(status == "error" for status, _ in results), "the kill hit no stream: the load ended too early"
    # Ray replaces the replica; the service serves on both again
    after = _wait_replicas(server, {MODEL: 2}, other_than={MODEL: before})[MODEL]
    new = set(after) - set(before)
    assert len(new) == 1, (before, after)

    async def probe() -> set[str]:
        async with _client(server) as client:
            return {(await _chat(client, MODEL, f"after {i}", 2, stream=False))[3] for i in range(20)}

    assert asyncio.run(probe()) == set(after)

