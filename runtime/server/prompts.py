"""Prompts on their way to the engine: a prompt that cannot fit the context is refused before the
tokenizer runs (text by its UTF-8 length, :mod:`llmc.runtime.server.prompt_length`; token ids by
their count), and the tokenizer runs in worker threads, ``max_tokenizing`` calls at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.errors import ContextLengthError
from llmc.runtime.server.errors import APIError, refusal
from llmc.runtime.server.prompt_length import UTF8_MAX, length_bound, utf8_length

T = TypeVar("T")


class PromptChecks:
    """Length checks before tokenizing, and the tokenizer's worker threads."""

    def __init__(self, tokenizer: LlmcTokenizer, context_length: int, max_tokenizing: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bound = length_bound(tokenizer)
        self.limiter = anyio.CapacityLimiter(max_tokenizing)

    def _room(self, max_tokens: int | None) -> int:
        """The most prompt tokens that leave room for ``max_tokens`` (None: at least one token)."""
        return self.context_length - (1 if max_tokens is None else max(max_tokens, 1))

    def check_text(self, text: str, max_tokens: int | None, what: str) -> None:
        """A 400 when ``text`` has more tokens than the context leaves, proved without tokenizing it."""
        bound = self.bound
        if bound is None:
            return
        room = self._room(max_tokens)
        if len(text) * UTF8_MAX <= room * bound.bytes_per_token:  # short enough, whatever its characters
            return
        least = bound.min_tokens(text)
        if least <= room:
            return
        wanted = "" if max_tokens is None else f", and max_tokens asks for {max_tokens} more"
        raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, your "
                       f"{what} is {utf8_length(text)} bytes long, at least {least} tokens (no token of this model "
                       f"spans more than {bound.bytes_per_token} bytes){wanted}. "
                       f"Please reduce the length of the {what}.", param=what, code="context_length_exceeded")

    def check_ids(self, ids: list[int], max_tokens: int | None, what: str) -> None:
        """The engine's context refusal for a token-id prompt, by its count alone (before decoding it)."""
        if len(ids) > self._room(max_tokens):
            raise refusal(ContextLengthError(len(ids), max_tokens, self.context_length), what)

    async def encode(self, texts: list[str], max_tokens: int | None, what: str = "prompt") -> list[list[int]]:
        """Token ids of ``texts`` (with special tokens), each checked for length first."""
        for text in texts:
            self.check_text(text, max_tokens, what)
        return await self.run(self.tokenizer.encode_batch, texts)

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` (tokenizer work: encoding, chat templates) in a worker thread, under the limit."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self.limiter)
