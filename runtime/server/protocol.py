"""Request bodies of the OpenAI API subset llmc serves (validated by pydantic; errors -> 400).

Beyond OpenAI's fields, requests accept the usual engine extensions (as vLLM does): ``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``. Unknown fields are ignored;
known OpenAI features llmc does not implement (tools, JSON response formats, logit_bias, ...)
are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmc.compiler.text import first_surrogate, not_unicode_message
from llmc.runtime.server.errors import APIError


def refuse_invalid_unicode(body: Any) -> None:
    """A 400 naming the first string of a JSON ``body`` (keys included) that is not valid Unicode:
    JSON may spell lone surrogates (``"\\ud800"``), which no tokenizer or UTF-8 encoder accepts."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            index = first_surrogate(value)
            if index is not None:
                raise APIError(400, not_unicode_message(value, index, repr(path) if path else "the request body"),
                               param=path or None, code="invalid_unicode")
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                index = first_surrogate(key) if isinstance(key, str) else None
                if index is not None:
                    raise APIError(400, not_unicode_message(key, index, "a field name"), code="invalid_unicode")
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}") for i, item in reversed(list(enumerate(value))))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


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

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        refuse_invalid_unicode(data)
        return data

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
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: a prompt as text, texts, token ids or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
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
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported by this server", param="echo",
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (function calling) is not supported by this server", param=name,
                               code="unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported by this server", param="tool_choice",
                           code="unsupported_parameter")
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"response_format {self.response_format.type!r} is not supported by this server",
                           param="response_format", code="unsupported_parameter")
        for i, m in enumerate(self.messages):
            if m.tool_calls or m.role == "tool":
                raise APIError(400, "tool messages are not supported by this server", param=f"messages.{i}",
                               code="unsupported_parameter")
        return self

    def completion_limit(self) -> int | None:
        """``max_completion_tokens`` (the current field) or ``max_tokens`` (deprecated alias)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template (content parts joined into text)."""
        out = []
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out
