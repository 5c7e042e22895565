"""Request bodies of the OpenAI API subset llmc serves (validated by pydantic; errors -> 400).

Beyond OpenAI's fields, requests accept the usual engine extensions (as vLLM does): ``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, and the constraints
``guided_json`` (a JSON Schema), ``guided_regex``, ``guided_grammar`` (Lark or GBNF) and
``guided_choice`` (one of some strings), on both endpoints beside ``response_format``.
Unknown fields are ignored; known OpenAI features llmc does not implement (``logit_bias``,
``suffix``, the deprecated ``functions``, ...) are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmc.runtime.server.errors import APIError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text" | "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class _GenerationRequest(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # engine extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # structured output (OpenAI's response_format, and vLLM's guided_* extensions)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        values = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in values):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        given = self.constraint_fields()
        if len(given) > 1:
            raise APIError(400, f"only one output constraint may be given, got {', '.join(given)}", param=given[1],
                           code="unsupported_parameter")
        return self

    def constraint_fields(self) -> list[str]:
        """The request's output-constraint fields that are set (``response_format`` ``text`` is none)."""
        given = [f for f in ("guided_json", "guided_regex", "guided_grammar", "guided_choice")
                 if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        return given

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: a prompt as text, texts, token ids or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # 0: only with echo (scores the prompt)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise APIError(400, "prompt must not be empty", param="prompt")
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix",
                           code="unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of different from n is not supported by this server", param="best_of",
                           code="unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens")
        if self.max_tokens == 0 and self.constraint_fields():
            raise APIError(400, "an output constraint needs max_tokens of at least 1", param="max_tokens",
                           code="unsupported_parameter")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts of the request: a list of texts or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[return-value]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call the assistant made (in the history); ``arguments`` is JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.functions:
            raise APIError(400, "functions (deprecated) is not supported by this server; use tools",
                           param="functions", code="unsupported_parameter")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise APIError(400, "tools must have distinct function names", param="tools")
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        if self.forces_tool_call and self.constraint_fields():
            raise APIError(400, f"tool_choice {self.tool_choice_name!r} cannot be combined with "
                           f"{self.constraint_fields()[0]}", param=self.constraint_fields()[0],
                           code="unsupported_parameter")
        for i, m in enumerate(self.messages):
            if m.role == "tool" and m.content is None:
                raise APIError(400, "a tool message needs content", param=f"messages.{i}.content")
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, "only assistant messages may have tool_calls", param=f"messages.{i}.tool_calls")
        return self

    @property
    def tool_choice_name(self) -> str:
        """``none``, ``auto``, ``required`` or the named function (the default: ``auto`` with tools)."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        return choice or ("auto" if self.tools else "none")

    @property
    def forces_tool_call(self) -> bool:
        """Whether the answer must be tool calls (``required`` or a named function)."""
        return bool(self.tools) and self.tool_choice_name not in ("none", "auto")

    def completion_limit(self) -> int | None:
        """``max_completion_tokens`` (the current field) or ``max_tokens`` (deprecated alias)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template (content parts joined into text; tool
        calls with their arguments as JSON text; see :mod:`llmc.runtime.server.tools`)."""
        out = []
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out
