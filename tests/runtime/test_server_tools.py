"""Tool formats: which one a chat template gets, how tools and tool history are rendered, how
calls are parsed back (whole and from any split of the stream), and a Llama 3.x template served."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

from fastapi.testclient import TestClient

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.server import create_app
from llmc.runtime.server.protocol import ChatCompletionRequest
from llmc.runtime.server.tools import HermesFormat, Llama3JsonFormat, tool_format_for
from tests.models import CHATML_TEMPLATE, byte_level_tokenizer
from tests.runtime.fakes import FakeExecutor

VOCAB = 99

# Llama 3.2's tool template, trimmed to its tool paths (the JSON call format, tools in the first user turn)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools is not none %}"
    "{{- 'Environment: ipython\\n' }}{%- endif %}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools is not none %}{%- set first_user_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- 'Given the following functions, please respond with a JSON for a function call ' }}"
    "{{- 'Respond in the format {\"name\": function name, \"parameters\": ' }}"
    "{{- 'dictionary of argument name and its value}.' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>'}}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}{{- '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
HERMES_TEMPLATE = CHATML_TEMPLATE.replace("{% for m", "{% if tools %}<tools>{{ tools | tojson }}</tools> answer with "
                                          "<tool_call>{% endif %}{% for m")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def _tokenizer(template: str) -> LlmcTokenizer:
    meta = TokenizerMeta(bos_token_id=0, eos_token_ids=[2], bos_token="<s>", eos_token="<|im_end|>",
                         chat_template=template)
    return LlmcTokenizer(byte_level_tokenizer(VOCAB, printable_only=True), meta)


def _render(tok: LlmcTokenizer, body: dict[str, Any]) -> str:
    ids = tool_format_for(tok).render(ChatCompletionRequest(**body))
    return tok.decode(ids, skip_special_tokens=False)


HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
]


def test_each_template_gets_its_format() -> None:
    assert isinstance(tool_format_for(_tokenizer(LLAMA3_TEMPLATE)), Llama3JsonFormat)
    hermes = tool_format_for(_tokenizer(HERMES_TEMPLATE))
    assert isinstance(hermes, HermesFormat) and hermes.native
    layer = tool_format_for(_tokenizer(CHATML_TEMPLATE))
    assert isinstance(layer, HermesFormat) and not layer.native


def test_llmc_layer_renders_tools_and_history_for_a_template_without_tools() -> None:
    text = _render(_tokenizer(CHATML_TEMPLATE), {"messages": HISTORY, "tools": [WEATHER]})
    assert text.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(WEATHER) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}' \
           "\n</tool_call><|im_end|>" in text
    assert "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = _render(_tokenizer(CHATML_TEMPLATE), {"messages": HISTORY[:1], "tools": [WEATHER], "tool_choice": "none"})
    assert "# Tools" not in plain  # tool_choice none: the tools are not offered


def test_llama3_template_renders_tools_and_history() -> None:
    text = _render(_tokenizer(LLAMA3_TEMPLATE), {"messages": HISTORY, "tools": [WEATHER]})
    assert "Environment: ipython" in text and '"name": "get_weather"' in text
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
            '"parameters": {"city": "Oslo", "unit": "C"}}<|eot_id|>') in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n-3 C<|eot_id|>" in text


CALLS_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
              '<tool_call>not json</tool_call>')


def test_hermes_parse() -> None:
    fmt = HermesFormat(_tokenizer(CHATML_TEMPLATE), native=False)
    content, calls = fmt.parse(CALLS_TEXT)
    assert content == "Let me check.\n\n\n<tool_call>not json</tool_call>"  # a broken block stays content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"}),
                                                                  ("get_time", {})]
    assert fmt.parse("no calls here") == ("no calls here", [])


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 11, 1000])
def test_hermes_stream_parser_agrees_with_parse(step: int) -> None:
    fmt = HermesFormat(_tokenizer(CHATML_TEMPLATE), native=False)
    parser = fmt.stream_parser()
    content, calls = "", []
    for i in range(0, len(CALLS_TEXT), step):
        got = parser.feed(CALLS_TEXT[i : i + step])
        assert "<tool_call>\n{" not in got.content
        content += got.content
        calls += got.calls
    rest = parser.finish()
    content += rest.content
    calls += rest.calls
    whole_content, whole_calls = fmt.parse(CALLS_TEXT)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert content.replace("\n", "") == (whole_content or "").replace("\n", "")
    text_only = fmt.stream_parser()
    assert text_only.feed("a <tool").content == "a " and text_only.finish().content == "<tool"


def test_llama3_parse_and_stream() -> None:
    fmt = Llama3JsonFormat(_tokenizer(LLAMA3_TEMPLATE))
    text = ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = fmt.parse(text)
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo", "unit": "F"}
    assert fmt.parse("{not a call") == ("{not a call", [])
    parser = fmt.stream_parser()
    assert parser.feed(text[:10]).content == "" and parser.feed(text[10:]).content == ""
    assert [c.name for c in parser.finish().calls] == ["get_weather", "get_time"]
    talk = fmt.stream_parser()
    assert talk.feed("Hello").content == "Hello"


@pytest.fixture
def llama_client() -> Iterator[TestClient]:
    executor = FakeExecutor(vocab=VOCAB, max_position=2048)
    with Engine(executor, _tokenizer(LLAMA3_TEMPLATE), EngineConfig(max_running=4)) as engine, \
            TestClient(create_app(engine, model_name="fake")) as client:
        yield client


def test_a_llama3_template_served_with_a_required_call(llama_client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 100, "temperature": 0}
    out = llama_client.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", out
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert args["city"] in ("Paris", "Oslo") and args["unit"] in ("C", "F")
    streamed = llama_client.post("/v1/chat/completions", json={**body, "stream": True}).text
    events = [json.loads(e[6:]) for e in streamed.split("\n\n") if e.startswith("data: {")]
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == args
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
