"""``llmc serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'llmc-toolchain[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from llmc.runtime.generate import generate_ids  # noqa: E402
from llmc.runtime.loader import LoadedModel, load_model  # noqa: E402
from llmc.runtime.sampling import SamplingParams  # noqa: E402
from tests.runtime.serving import API_KEY, MODEL, ServerProcess, metric  # noqa: E402

CONTEXT = 4096  # the chat_model fixture's context
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(chat_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with ServerProcess(chat_model[1], "--api-key", API_KEY, "--served-model-name", MODEL, log=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(chat_model: tuple[Path, Path]) -> LoadedModel:
    """The artifact run in this process by the single-sequence generator (no engine, no server)."""
    return load_model(str(chat_model[1]))


def _greedy(model: LoadedModel, ids: list[int], n: int) -> list[int]:
    return generate_ids(model, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).token_ids


def _chat_prompt(model: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    tok = model.tokenizer
    assert tok is not None
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi!"}]


def test_health_and_models(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # open without a key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_completion_matches_reference_generation(client: openai.OpenAI, reference: LoadedModel) -> None:
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                    extra_body=NO_EOS)
    ids = reference.tokenizer.encode("Once upon a time")
    expected = reference.tokenizer.decode(_greedy(reference, ids, 12))
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_token_prompts_and_batches(client: openai.OpenAI, reference: LoadedModel) -> None:
    ids_a = reference.tokenizer.encode("abc")
    ids_b = reference.tokenizer.encode("xyz!")
    out = client.completions.create(model=MODEL, prompt=[ids_a, ids_b], max_tokens=5, temperature=0,
                                    extra_body=NO_EOS)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text == reference.tokenizer.decode(_greedy(reference, ids_a, 5))
    assert out.choices[1].text == reference.tokenizer.decode(_greedy(reference, ids_b, 5))
    assert out.usage.prompt_tokens == len(ids_a) + len(ids_b)
    assert out.usage.completion_tokens == 10


def test_chat_matches_reference_and_counts_usage(client: openai.OpenAI, reference: LoadedModel) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0,
                                         extra_body=NO_EOS)
    prompt = _chat_prompt(reference, MESSAGES)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference.tokenizer.decode(_greedy(reference, prompt, 10))
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == 10


def test_streaming_chat_equals_the_whole_response(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                           extra_body=NO_EOS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_sse_ending_with_done(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert sum(len(p["choices"]) for p in payloads) >= 4
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="The end", max_tokens=40, temperature=0, extra_body=NO_EOS)
    text = free.choices[0].text
    stop = next(text[i:i + 3] for i in range(3, len(text) - 3) if text.find(text[i:i + 3]) >= 3)
    expected = text[:text.find(stop)]
    out = client.completions.create(model=MODEL, prompt="The end", max_tokens=40, temperature=0, stop=[stop],
                                    extra_body=NO_EOS)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 40
    streamed = client.completions.create(model=MODEL, prompt="The end", max_tokens=40, temperature=0, stop=stop,
                                         stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seeded_sampling_is_reproducible_and_n_derives_seeds(client: openai.OpenAI) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0,
                                             top_p=0.95, seed=seed, n=n, extra_body=NO_EOS)
        assert [c.index for c in out.choices] == list(range(n))
        assert out.usage.completion_tokens == 24 * n
        return [c.message.content for c in out.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    three = sample(1234, n=3)
    assert three[0] == first[0]  # choice i uses seed + i
    assert three[1] == sample(1235)[0]
    assert len(set(three)) == 3


def test_chat_logprobs_match_the_model(client: openai.OpenAI, chat_model: tuple[Path, Path],
                                       reference: LoadedModel) -> None:
    import torch
    from transformers import LlamaForCausalLM

    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3, extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    prompt = _chat_prompt(reference, MESSAGES)
    generated = _greedy(reference, prompt, 6)
    hf = LlamaForCausalLM.from_pretrained(chat_model[0], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1).numpy()
    for step, entry in enumerate(content):
        token_id = generated[step]
        assert entry.token == reference.tokenizer.decode([token_id])
        assert bytes(entry.bytes) == entry.token.encode()
        assert entry.logprob == pytest.approx(logp[step, token_id], abs=1e-3)
        assert len(entry.top_logprobs) == 3
        best = np.argsort(-logp[step])[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(list(logp[step, best]), abs=1e-3)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token


def test_completion_logprobs_format(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens).replace("<|im_end|>", "") == out.choices[0].text  # special tokens are not text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3 and top[token] == value
        assert max(top.values()) == pytest.approx(value)  # greedy


def test_errors_surface_as_client_exceptions(server: ServerProcess, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=CONTEXT)
    message = str(too_long.value)
    assert f"{CONTEXT} tokens" in message and f"{CONTEXT + 6} tokens" in message and "6 in the prompt" in message
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_temp:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=7)
    assert bad_temp.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)


def test_error_bodies_follow_openai_format(server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def check(response: httpx.Response, status: int) -> dict[str, object]:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error

    url = f"{server.url}/v1/chat/completions"
    assert check(httpx.post(url, json={"messages": MESSAGES}), 401)["type"] == "authentication_error"
    bad_json = httpx.post(url, content=b'{"messages": [', headers={**auth, "content-type": "application/json"})
    assert check(bad_json, 400)["code"] == "invalid_json"
    assert check(httpx.post(url, json={"model": MODEL}, headers=auth), 400)["param"] == "messages"
    wrong_type = httpx.post(url, json={"messages": MESSAGES, "max_tokens": "many"}, headers=auth)
    assert check(wrong_type, 400)["param"] == "max_tokens"
    tools = httpx.post(url, json={"messages": MESSAGES, "tools": [{"type": "function"}]}, headers=auth)
    assert check(tools, 400)["param"] == "tools.0.function"
    functions = httpx.post(url, json={"messages": MESSAGES, "functions": [{"name": "f"}]}, headers=auth)
    assert check(functions, 400)["code"] == "unsupported_parameter"
    oov = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5, 100000]}, headers=auth)
    assert "outside the vocabulary" in check(oov, 400)["message"]
    check(httpx.get(f"{server.url}/v1/nothing-here", headers=auth), 404)


def test_metrics_parse_and_move(server: ServerProcess, client: openai.OpenAI) -> None:
    before = server.metrics()
    client.completions.create(model=MODEL, prompt="count me", max_tokens=7, temperature=0, extra_body=NO_EOS)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("llmc_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert delta("llmc_http_requests_total", endpoint="/v1/completions", status="404") == 1
    assert delta("llmc_generation_tokens_total") == 7
    assert delta("llmc_prompt_tokens_total") == 9  # BOS + "count me"
    assert delta("llmc_time_to_first_token_seconds_count") == 1
    assert delta("llmc_time_per_output_token_seconds_count") == 1
    assert delta("llmc_sequences_finished_total", finish_reason="length") == 1
    assert metric(after, "llmc_num_requests_running") == 0
    assert metric(after, "llmc_num_requests_waiting") == 0
    assert metric(after, "llmc_kv_cache_total_blocks") > 0
    assert 0 <= metric(after, "llmc_kv_cache_usage_ratio") <= 1
