"""The server app in-process over an engine with a fake executor: failures become OpenAI errors
and never take the server down; request validation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

from fastapi.testclient import TestClient

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.server import create_app
from tests.models import CHATML_TEMPLATE, byte_level_tokenizer
from tests.runtime.fakes import FakeExecutor, reference

VOCAB = 99
POISON = "~"  # the fake executor fails on a step that feeds this character's token (in a prompt or sampled)


@pytest.fixture
def tokenizer() -> LlmcTokenizer:
    meta = TokenizerMeta(bos_token_id=0, eos_token_ids=[2], bos_token="<s>", eos_token="<|im_end|>",
                         chat_template=CHATML_TEMPLATE)
    return LlmcTokenizer(byte_level_tokenizer(VOCAB, printable_only=True), meta)


@pytest.fixture
def engine(tokenizer: LlmcTokenizer) -> Iterator[Engine]:
    poison = tokenizer.encode(POISON, add_special_tokens=False)[0]
    executor = FakeExecutor(vocab=VOCAB, max_position=128, fail_on=poison)
    with Engine(executor, tokenizer, EngineConfig(max_running=4)) as eng:
        yield eng


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, model_name="fake"), raise_server_exceptions=False) as c:
        yield c


def _error(response: object, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_failing_step_is_a_500_and_the_server_keeps_serving(client: TestClient, engine: Engine) -> None:
    bad = {"model": "fake", "prompt": f"a{POISON}b", "max_tokens": 4}
    error = _error(client.post("/v1/completions", json=bad), 500)
    assert error["type"] == "internal_server_error" and "fake executor failure" in str(error["message"])
    with client.stream("POST", "/v1/completions", json={**bad, "stream": True}) as r:
        assert r.status_code == 200  # the failure comes after the headers: in-band, then [DONE]
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert "fake executor failure" in json.loads(events[-2][len("data: "):])["error"]["message"]
    # greedy: sampled at temperature 1 the good request itself draws the poison token now and then (the fake's
    # logits give it 1/246 a token) and its next step fails; its greedy continuation is known not to
    poison = engine.tokenizer.encode(POISON, add_special_tokens=False)[0]
    expected = reference(engine.tokenizer.encode("abc"), 3, VOCAB)
    assert poison not in expected
    ok = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 3
    assert ok.json()["choices"][0]["text"] == engine.tokenizer.decode(expected)
    metrics = client.get("/metrics").text
    assert 'llmc_http_requests_total{endpoint="/v1/completions",status="500"} 1.0' in metrics
    assert 'llmc_sequences_finished_total{finish_reason="error"} 2.0' in metrics
    assert "llmc_sequences_aborted_total 0.0" in metrics
    assert engine.stats()["kv_used_blocks"] == 0


def test_an_unexpected_exception_is_a_logged_500(client: TestClient, engine: Engine,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, object]:
        raise KeyError("stats are gone")

    monkeypatch.setattr(engine, "stats", broken)
    error = _error(client.get("/metrics"), 500)
    assert "KeyError" in str(error["message"])
    assert any("unhandled error in GET /metrics" in r.getMessage() for r in caplog.records)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_invalid_chat_requests_are_400(client: TestClient, body: dict[str, object], param: str) -> None:
    assert _error(client.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_content_parts_n_and_echo(client: TestClient, tokenizer: LlmcTokenizer) -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "He"}, {"type": "text", "text": "y"}]}],
             "max_tokens": 3, "n": 2, "temperature": 0}
    plain = {**parts, "messages": [{"role": "user", "content": "Hey"}]}
    a = client.post("/v1/chat/completions", json=parts).json()
    b = client.post("/v1/chat/completions", json=plain).json()
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 6
    echo = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "echo": True, "temperature": 0})
    text = echo.json()["choices"][0]["text"]
    assert text.startswith("abc") and len(text) > 3


def test_a_body_that_is_not_json_is_400(client: TestClient) -> None:
    form = client.post("/v1/completions", content=b"prompt=hi",
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert "must be a JSON object" in str(_error(form, 400)["message"])


def test_a_stopped_engine_is_503(client: TestClient, engine: Engine) -> None:
    engine.close()
    assert client.get("/health").status_code == 503
    refused = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert _error(refused, 503)["code"] == "engine_stopped"


def test_serve_refuses_an_artifact_without_tokenizer(stories_artifact: object) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    result = CliRunner().invoke(main, ["serve", str(stories_artifact), "--port", "0"])
    assert result.exit_code == 2
    assert "no tokenizer" in result.output


def test_negative_and_huge_seeds_are_accepted(client: TestClient) -> None:
    body = {"prompt": "abc", "max_tokens": 4, "temperature": 1.0}
    for seed in (-5, 2**63 - 1):
        a = client.post("/v1/completions", json={**body, "seed": seed, "n": 2})
        b = client.post("/v1/completions", json={**body, "seed": seed, "n": 2})
        assert a.status_code == 200, a.text
        assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]


def test_chat_without_max_tokens_fills_the_context_or_is_refused(client: TestClient,
                                                                 tokenizer: LlmcTokenizer) -> None:
    def chat(content: str) -> object:
        return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                         "temperature": 0, "ignore_eos": True})

    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]),
                              add_special_tokens=False)
    ok = chat("hi")
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 128 - len(prompt),
                                  "total_tokens": 128}
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    error = _error(chat("x" * 200), 400)
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert "maximum context length is 128 tokens" in str(error["message"])
    assert "which leaves no room for the completion" in str(error["message"])
    too_long = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 200})
    error = _error(too_long, 400)
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert "(4 in the prompt, 200 for the completion)" in str(error["message"])


def test_the_model_card_and_the_length_check_use_the_engines_max_model_len(tokenizer: LlmcTokenizer) -> None:
    executor = FakeExecutor(vocab=VOCAB, max_position=128)
    with Engine(executor, tokenizer, EngineConfig(max_running=4, max_model_len=32)) as eng, \
            TestClient(create_app(eng, model_name="fake"), raise_server_exceptions=False) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["max_model_len"] == 32
        error = _error(c.post("/v1/completions", json={"model": "fake", "prompt": "a" * 40, "max_tokens": 1}), 400)
        assert error["code"] == "context_length_exceeded" and "32 tokens" in str(error["message"])


def test_metrics_give_the_engine_steps_and_their_time_by_kind(client: TestClient) -> None:
    ok = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200, ok.text
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("llmc_engine_steps_total", "llmc_engine_executor_seconds_total")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['llmc_engine_steps_total{kind="other"}'] == 1  # the prompt, sampling the first token
    assert values['llmc_engine_steps_total{kind="decode"}'] == 2
    assert values['llmc_engine_executor_seconds_total{kind="decode"}'] > 0
    assert values['llmc_engine_executor_seconds_total{kind="other"}'] > 0
