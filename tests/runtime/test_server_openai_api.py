"""``llmc serve`` with the official ``openai`` client: prompt logprobs with ``echo``, structured
outputs (``response_format``, ``guided_*``, ``chat.completions.parse``), tool calls (whole and
streamed) and the 400s of bad schemas and unsupported combinations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'llmc-toolchain[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (it is in the bench extra)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from pydantic import BaseModel, Field  # noqa: E402

from llmc.runtime.evaluate import scored_logits  # noqa: E402
from llmc.runtime.loader import LoadedModel, load_model  # noqa: E402
from llmc.runtime.sampling import log_softmax  # noqa: E402
from tests.runtime.serving import API_KEY, MODEL, ServerProcess  # noqa: E402

USER = [{"role": "user", "content": "Hi there"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
    "pet": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                                          "required": ["kind"], "additionalProperties": False}]},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "pet", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(chat_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve-api-log") / "server.log"
    with ServerProcess(chat_model[1], "--api-key", API_KEY, "--served-model-name", MODEL, log=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(chat_model: tuple[Path, Path]) -> LoadedModel:
    return load_model(str(chat_model[1]))


# -- prompt logprobs ------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_logprobs_score_the_prompt(client: openai.OpenAI, reference: LoadedModel, max_tokens: int) -> None:
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                    temperature=0)
    choice = out.choices[0]
    ids = reference.tokenizer.encode(prompt)
    rows = dict(scored_logits(reference.executor, ids))
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for p in range(1, len(ids)):
        ref = log_softmax(rows[p])
        assert lp.token_logprobs[p] == pytest.approx(ref[ids[p]], abs=1e-4)
        best = np.argsort(-ref)[:2]
        top = lp.top_logprobs[p]
        assert lp.tokens[p] in top and len(top) in (2, 3)
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(list(ref[best]), abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == max_tokens


def test_streamed_echo_logprobs_equal_the_whole(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"model": MODEL, "prompt": "abc def", "max_tokens": 3, "echo": True, "logprobs": 1,
                            "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values[0] is None and whole.logprobs.token_logprobs[0] is None
    assert values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-6)


# -- structured outputs ---------------------------------------------------------------------
def test_json_schema_holds_for_50_seeded_samples(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=USER, n=50, seed=11, temperature=1.0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    assert len(out.choices) == 50
    texts = [c.message.content for c in out.choices]
    for choice, text in zip(out.choices, texts, strict=True):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert choice.finish_reason == "stop"
    assert len(set(texts)) > 10  # really sampled


def test_json_object_regex_choice_and_grammar(client: openai.OpenAI) -> None:
    obj = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=100, temperature=0.7, seed=1,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = client.completions.create(model=MODEL, prompt="Date:", max_tokens=20, temperature=1.0, seed=2,
                                      extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"})
    assert regex.choices[0].text[:2] == "20" and len(regex.choices[0].text) == 10
    choice = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=1.0, seed=3,
                                            extra_body={"guided_choice": ["red (dark)", "blue?", "green"]})
    assert choice.choices[0].message.content in ("red (dark)", "blue?", "green")
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    grammar = client.completions.create(model=MODEL, prompt="Sum:", max_tokens=30, temperature=1.0, seed=4,
                                        extra_body={"guided_grammar": gbnf})
    text = grammar.choices[0].text
    assert text.startswith("(") and (text.endswith(")") or grammar.choices[0].finish_reason == "length")


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=30)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Pet, max_tokens=120,
                                        temperature=1.0, seed=5)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.age <= 30 and len(pet.name) <= 8


# -- tools ----------------------------------------------------------------------------------
def _check_call(call: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, spec["parameters"])
    assert call.id.startswith("call_") and call.type == "function"
    return args


def test_required_tool_call_round_trip(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    out = client.chat.completions.create(model=MODEL, messages=USER, tools=tools, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    _check_call(call, tools)
    history = [*USER, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"result": 21}'}]
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=tools, tool_choice="none",
                                            max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert follow.choices[0].message.tool_calls is None and follow.choices[0].finish_reason == "length"
    alone = client.chat.completions.create(model=MODEL, messages=USER, tools=tools, tool_choice="none", max_tokens=1)
    call_text = len(call.function.arguments) + len('{"result": 21}')  # one token per byte
    assert follow.usage.prompt_tokens > alone.usage.prompt_tokens + call_text  # the call and result are in it


def test_named_tool_choice_and_parallel_calls(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    named = client.chat.completions.create(
        model=MODEL, messages=USER, tools=tools, max_tokens=200, temperature=1.0, seed=9,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    for c in calls:
        _check_call(c, tools)


def test_streamed_tool_calls_assemble(client: openai.OpenAI) -> None:
    tools = [WEATHER, TIME]
    args: dict[str, Any] = {"model": MODEL, "messages": USER, "tools": tools, "tool_choice": "required",
                            "max_tokens": 160, "temperature": 1.0, "seed": 21}
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    assembled: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            slot = assembled.setdefault(d.index, {"name": "", "arguments": ""})
            if d.function and d.function.name:
                slot["name"] += d.function.name
            if d.function and d.function.arguments:
                slot["arguments"] += d.function.arguments
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for _, s in sorted(assembled.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole]


class Lookup(BaseModel):
    """Look a word up."""

    word: str = Field(max_length=6)
    lang: Literal["en", "fr"]


def test_stream_helper_parses_tool_arguments(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=MODEL, messages=USER, tools=[openai.pydantic_function_tool(Lookup)],
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                        temperature=0.5, seed=3) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "Lookup" and isinstance(call.function.parsed_arguments, Lookup)


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": "zero"}}}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                  "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wrong"}}}}}],
        "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.0.tool_calls.0"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
])
def test_bad_schemas_and_combinations_are_openai_400s(server: ServerProcess, path: str, body: dict[str, Any],
                                                      param: str) -> None:
    base = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "hi"}
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, "max_tokens": 4, **base, **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
