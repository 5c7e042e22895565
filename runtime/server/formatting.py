"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmc.runtime.server.generation import ChoiceResult, Delta, TokenLogprob
from llmc.runtime.server.tokens import TokenBytes

if TYPE_CHECKING:
    from llmc.runtime.server.tools import ParsedCall

DONE = b"data: [DONE]\n\n"
_TEXT = "\x00llmc-text\x00"  # stands for the text in a chunk's template (encoded as \u0000llmc-text\u0000)
_encode_string = json.encoder.encode_basestring  # json.dumps(text, ensure_ascii=False), without an encoder per call


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def join_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two completion ``logprobs`` objects, one after the other."""
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def usage_of(results: list[ChoiceResult], prompt_tokens: int) -> dict[str, int]:
    return usage(prompt_tokens, sum(len(r.token_ids) for r in results))


class Formatter:
    """Builds the JSON of one request's response (ids, timestamps and model name fixed per request)."""

    def __init__(self, request_id: str, model: str, token_bytes: TokenBytes) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokens = token_bytes
        self._text_templates: dict[tuple[int, bool, bool], tuple[bytes, bytes]] = {}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- logprobs ------------------------------------------------------------------------------
    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.tokens.text_of(token_id), "logprob": logprob,
                "bytes": list(self.tokens.bytes_of(token_id))}

    def chat_logprobs(self, logprobs: list[TokenLogprob], top_n: int) -> dict[str, Any]:
        content = []
        for lp in logprobs:
            entry = self._chat_entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._chat_entry(t, v) for t, v in lp.top[:top_n]]
            content.append(entry)
        return {"content": content, "refusal": None}

    def completion_logprobs(self, logprobs: list[TokenLogprob], top_n: int, offset: int) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for lp in logprobs:
            text = self.tokens.text_of(lp.token_id)
            tokens.append(text)
            token_logprobs.append(lp.logprob)
            alternatives = {self.tokens.text_of(t): v for t, v in lp.top[:top_n]}
            alternatives.setdefault(text, lp.logprob)  # the sampled token is always listed
            top.append(alternatives)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def prompt_logprobs(self, prompt_ids: list[int], scored: list[TokenLogprob | None],
                        top_n: int) -> dict[str, Any]:
        """The echoed prompt's part of a completion's ``logprobs`` (the first token has none)."""
        first = self.tokens.text_of(prompt_ids[0])
        head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
        rest = [lp for lp in scored[1:] if lp is not None]
        return join_logprobs(head, self.completion_logprobs(rest, top_n, len(first)))

    def text_length(self, token_ids: list[int]) -> int:
        """The length of the tokens' texts as the logprobs' ``text_offset`` counts them."""
        return sum(len(self.tokens.text_of(t)) for t in token_ids)

    # -- completions ---------------------------------------------------------------------------
    def completion(self, results: list[ChoiceResult], prompt_tokens: int, top_n: int | None,
                   echo_texts: list[str] | None = None, prompt_ids: list[list[int]] | None = None) -> dict[str, Any]:
        """``prompt_ids[i]`` (with ``echo`` and ``top_n``) are choice ``i``'s prompt, whose logprobs lead."""
        choices = []
        for r in results:
            prefix = echo_texts[r.index] if echo_texts else ""
            logprobs = None
            if top_n is not None:
                if prompt_ids is not None and r.prompt_logprobs is not None:
                    head = self.prompt_logprobs(prompt_ids[r.index], r.prompt_logprobs, top_n)
                    offset = self.text_length(prompt_ids[r.index])
                    logprobs = join_logprobs(head, self.completion_logprobs(r.logprobs, top_n, offset))
                else:
                    logprobs = self.completion_logprobs(r.logprobs, top_n, 0)
            choices.append({"index": r.index, "text": prefix + r.text, "logprobs": logprobs,
                            "finish_reason": r.finish_reason})
        return {**self._head("text_completion"), "choices": choices, "usage": usage_of(results, prompt_tokens)}

    def completion_chunk(self, index: int, delta: Delta, top_n: int | None, offset: int, text: str | None = None,
                         include_usage: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        """One choice's chunk; ``logprobs`` (an echoed prompt's) replaces the delta's."""
        if logprobs is None and top_n is not None:
            logprobs = self.completion_logprobs(delta.logprobs or [], top_n, offset)
        choice = {"index": index, "text": delta.text if text is None else text, "logprobs": logprobs,
                  "finish_reason": delta.finish_reason}
        chunk = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def text_event(self, index: int, text: str, *, chat: bool, include_usage: bool) -> bytes:
        """The event of a chunk that carries only new text (no logprobs, no finish reason): the bytes
        of ``sse(completion_chunk(index, Delta(text, ...), None, 0, include_usage=...))``, or with
        ``chat`` of ``sse(chat_chunk(index, {"content": text}, include_usage=...))``, from a template
        made once per choice (the chunk's JSON around the text)."""
        key = (index, chat, include_usage)
        template = self._text_templates.get(key)
        if template is None:
            if chat:
                chunk = self.chat_chunk(index, {"content": _TEXT}, include_usage=include_usage)
            else:
                chunk = self.completion_chunk(index, Delta(_TEXT, []), None, 0, include_usage=include_usage)
            head, _, tail = sse(chunk).rpartition(_encode_string(_TEXT).encode())
            template = self._text_templates[key] = (head, tail)
        return template[0] + _encode_string(text).encode() + template[1]

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, results: list[ChoiceResult], prompt_tokens: int, top_n: int | None,
             tool_calls: Callable[[str], tuple[str | None, list[ParsedCall]]] | None = None) -> dict[str, Any]:
        """``tool_calls`` (with tools offered) splits an output into content and calls."""
        choices = []
        for r in results:
            message: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
            finish = r.finish_reason
            if tool_calls is not None:
                content, calls = tool_calls(r.text)
                if calls:
                    message["content"] = content
                    message["tool_calls"] = [c.to_openai() for c in calls]
                    finish = "tool_calls"
            choices.append({"index": r.index, "message": message,
                            "logprobs": None if top_n is None else self.chat_logprobs(r.logprobs, top_n),
                            "finish_reason": finish})
        return {**self._head("chat.completion"), "choices": choices, "usage": usage_of(results, prompt_tokens)}

    def chat_chunk(self, index: int, delta: dict[str, Any], *, logprobs: dict[str, Any] | None = None,
                   finish_reason: str | None = None, include_usage: bool = False) -> dict[str, Any]:
        chunk = {**self._head("chat.completion.chunk"),
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
