"""Tool calling for ``/v1/chat/completions``: render ``tools`` and tool history into the prompt,
constrain the output when ``tool_choice`` demands a call, and parse calls back out (whole, or as
stream deltas).

Two formats, chosen from the model's chat template (:func:`tool_format_for`):

- **Llama 3.x JSON** (templates that render ``tools`` and ask for ``"parameters"``, as Llama
  3.1-3.3's do): the template renders the tools and the history; a call is
  ``{"name": ..., "parameters": {...}}``, several separated by ``; ``.
- **Hermes** (``<tool_call>`` blocks): templates that render ``tools`` with ``<tool_call>``
  (Qwen 2.5, Hermes) do it themselves; for templates that know nothing of tools (SmolLM2's
  ChatML, any other) llmc's own layer writes the tool list and the call format into the system
  message, assistant calls into ``<tool_call>`` blocks and tool results into ``<tool_response>``
  user turns. A call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

With ``tool_choice`` ``required`` or a named function the output is constrained (the same
grammar engine as ``response_format``) to one call (``parallel_tool_calls: false``) or one or
more, each call's arguments valid against its function's ``parameters`` schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.server.errors import APIError
from llmc.runtime.server.protocol import ChatCompletionRequest, Tool
from llmc.runtime.structured import JSON_LAYOUT, Constraint


@dataclass
class ParsedCall:
    """One call found in the output; ``arguments`` is JSON text (OpenAI's form)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _tool_dicts(tools: list[Tool]) -> list[dict[str, Any]]:
    """Tools as the plain dicts chat templates expect."""
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t.function.name}
        if t.function.description:
            fn["description"] = t.function.description
        fn["parameters"] = t.function.parameters or {"type": "object"}
        out.append({"type": "function", "function": fn})
    return out


def _arguments_object(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise APIError(400, f"tool call arguments must be JSON text: {exc}", param=where) from exc


def _call_schema(tools: list[Tool], args_key: str) -> dict[str, Any]:
    options = []
    for t in tools:
        options.append({"type": "object",
                        "properties": {"name": {"const": t.function.name},
                                       args_key: t.function.parameters or {"type": "object"}},
                        "required": ["name", args_key], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}


class ToolFormat:
    """How one chat template carries tools; subclasses implement a format."""

    args_key = "arguments"

    def __init__(self, tokenizer: LlmcTokenizer) -> None:
        self.tokenizer = tokenizer

    # -- prompt ----------------------------------------------------------------------------
    def render(self, req: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids: messages, tool history and (unless ``tool_choice`` is none) the tools."""
        raise NotImplementedError

    # -- output ----------------------------------------------------------------------------
    def constraint(self, tools: list[Tool], parallel: bool) -> Constraint:
        """Calls to ``tools``, one or (``parallel``) several."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a finished output; no calls: the whole text is content."""
        raise NotImplementedError

    def stream_parser(self) -> ToolStreamParser:
        raise NotImplementedError


class HermesFormat(ToolFormat):
    """``<tool_call>`` blocks; rendered by the template itself or (``native=False``) by llmc."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
    SYSTEM = (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}}\n</tool_call>"
    )

    def __init__(self, tokenizer: LlmcTokenizer, native: bool) -> None:
        super().__init__(tokenizer)
        self.native = native

    def _block(self, name: str, arguments: Any) -> str:
        return f"{self.OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{self.CLOSE}"

    def render(self, req: ChatCompletionRequest) -> list[int]:
        tools = _tool_dicts(req.tools) if req.tools and req.tool_choice_name != "none" else None
        messages = req.chat_messages()
        if self.native:
            for i, m in enumerate(messages):
                for j, c in enumerate(m.get("tool_calls") or []):
                    fn = c["function"]
                    fn["arguments"] = _arguments_object(fn["arguments"], f"messages.{i}.tool_calls.{j}")
            return self.tokenizer.encode_chat(messages, tools=tools)
        out: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if m["role"] == "tool":
                out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
            elif m.get("tool_calls"):
                blocks = [self._block(c["function"]["name"],
                                      _arguments_object(c["function"]["arguments"], f"messages.{i}.tool_calls.{j}"))
                          for j, c in enumerate(m["tool_calls"])]
                content = "\n".join(([m["content"]] if m["content"] else []) + blocks)
                out.append({"role": "assistant", "content": content})
            else:
                out.append({k: v for k, v in m.items() if k != "tool_call_id"})
        if tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            system = self.SYSTEM.format(tools=listing)
            if out and out[0]["role"] in ("system", "developer"):
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
            else:
                out.insert(0, {"role": "system", "content": system})
        return self.tokenizer.encode_chat(out)

    def constraint(self, tools: list[Tool], parallel: bool) -> Constraint:
        schema = json.dumps(_call_schema(tools, self.args_key))
        repeat = ' ("\\n" call)*' if parallel else ""
        lark = f'start: call{repeat}\ncall: "{self.OPEN}\\n" body "\\n{self.CLOSE}"\nbody: %json {schema}\n'
        return Constraint.grammar(lark, "tools")

    def _call(self, block: str) -> ParsedCall | None:
        try:
            obj = json.loads(block)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        calls, kept, last = [], [], 0
        for m in self._BLOCK.finditer(text):
            call = self._call(m.group(1))
            if call is None:
                continue
            calls.append(call)
            kept.append(text[last : m.start()])
            last = m.end()
        if not calls:
            return text, []
        content = ("".join(kept) + text[last:]).strip()
        return content or None, calls

    def stream_parser(self) -> ToolStreamParser:
        return HermesStreamParser(self)


class Llama3JsonFormat(ToolFormat):
    """Llama 3.x's JSON tool calls (``{"name": ..., "parameters": {...}}``), rendered by its template."""

    args_key = "parameters"
    SEPARATOR = "; "

    def render(self, req: ChatCompletionRequest) -> list[int]:
        tools = _tool_dicts(req.tools) if req.tools and req.tool_choice_name != "none" else None
        messages = req.chat_messages()
        for i, m in enumerate(messages):
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c["function"]
                fn["arguments"] = _arguments_object(fn["arguments"], f"messages.{i}.tool_calls.{j}")
        return self.tokenizer.encode_chat(messages, tools=tools)

    def constraint(self, tools: list[Tool], parallel: bool) -> Constraint:
        schema = json.dumps(_call_schema(tools, self.args_key))
        repeat = f' ("{self.SEPARATOR}" body)*' if parallel else ""
        return Constraint.grammar(f"start: body{repeat}\nbody: %json {schema}\n", "tools")

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            args = obj.get("parameters", obj.get("arguments", {}))
            calls.append(ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False)))
            pos = end
            while pos < len(body) and body[pos] in "; \n\t":
                pos += 1
        return None, calls

    def stream_parser(self) -> ToolStreamParser:
        return BufferedStreamParser(self)


def tool_format_for(tokenizer: LlmcTokenizer) -> ToolFormat:
    """The tool format of a model's chat template (see the module docstring)."""
    template = tokenizer.meta.chat_template or ""
    if tokenizer.template_renders_tools and "<tool_call>" in template:
        return HermesFormat(tokenizer, native=True)
    if tokenizer.template_renders_tools and "parameters" in template:
        return Llama3JsonFormat(tokenizer)
    return HermesFormat(tokenizer, native=False)


# -- streaming ------------------------------------------------------------------------------
@dataclass
class StreamEvents:
    """What a piece of streamed text turned into: content to send, and complete calls."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolStreamParser:
    """Splits streamed output into content deltas and tool calls."""

    def feed(self, text: str) -> StreamEvents:
        raise NotImplementedError

    def finish(self) -> StreamEvents:
        raise NotImplementedError


class HermesStreamParser(ToolStreamParser):
    """Content passes through (holding back what may be the start of ``<tool_call>``); each
    ``<tool_call>`` block becomes a call when it closes."""

    def __init__(self, fmt: HermesFormat) -> None:
        self.fmt = fmt
        self.buf = ""
        self.in_call = False
        self.num_calls = 0
        self.pending_space = ""  # whitespace-only content is sent once real content follows

    def _content(self, text: str, events: StreamEvents) -> None:
        if not text:
            return
        if not text.strip():
            self.pending_space += text
            return
        events.content += self.pending_space + text
        self.pending_space = ""

    def feed(self, text: str) -> StreamEvents:
        self.buf += text
        events = StreamEvents()
        open_, close = self.fmt.OPEN, self.fmt.CLOSE
        while True:
            if not self.in_call:
                at = self.buf.find(open_)
                if at >= 0:
                    self._content(self.buf[:at], events)
                    self.buf = self.buf[at:]
                    self.in_call = True
                    continue
                hold = next((k for k in range(min(len(open_) - 1, len(self.buf)), 0, -1)
                             if open_.startswith(self.buf[-k:])), 0)
                self._content(self.buf[: len(self.buf) - hold], events)
                self.buf = self.buf[len(self.buf) - hold :]
                return events
            end = self.buf.find(close)
            if end < 0:
                return events
            block = self.buf[: end + len(close)]
            self.buf = self.buf[end + len(close) :]
            self.in_call = False
            _, calls = self.fmt.parse(block)
            if calls:
                events.calls += calls
                self.num_calls += len(calls)
                self.pending_space = ""
            else:
                self._content(block, events)

    def finish(self) -> StreamEvents:
        events = StreamEvents()
        rest, self.buf = self.buf, ""
        self._content(rest, events)
        if not self.num_calls:
            events.content += self.pending_space
        self.pending_space = ""
        return events


class BufferedStreamParser(ToolStreamParser):
    """For formats whose calls are the whole output: text that begins like a call is held and
    parsed at the end; other text streams as content."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.buf = ""
        self.mode: str | None = None  # "content" or "call", decided by the first non-space text

    def feed(self, text: str) -> StreamEvents:
        if self.mode == "content":
            return StreamEvents(content=text)
        self.buf += text
        head = self.buf.lstrip().removeprefix("<|python_tag|>").lstrip()
        if not head:
            return StreamEvents()
        if head.startswith("{"):
            self.mode = "call"
            return StreamEvents()
        self.mode = "content"
        out, self.buf = self.buf, ""
        return StreamEvents(content=out)

    def finish(self) -> StreamEvents:
        out, self.buf = self.buf, ""
        if not out:
            return StreamEvents()
        content, calls = self.fmt.parse(out)
        return StreamEvents(content=content or "", calls=calls)
