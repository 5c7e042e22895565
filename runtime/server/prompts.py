"""Prompts on their way to the engine: a prompt that cannot fit the context is refused before the
tokenizer runs (text by its UTF-8 length, :mod:`llmc.runtime.server.prompt_length`; token ids by
their count), and the tokenizer runs in worker threads, ``max_tokenizing`` calls at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.errors import ContextLengthError, TokenIdError
from llmc.runtime.server.errors import APIError, refusal
from llmc.runtime.server.prompt_length import UTF8_MAX, length_bound, utf8_length

T = TypeVar("T")

SHORT_TEXT_PER_TOKEN = 4
"""A text of at most this many characters per token of context is tokenized whatever its length
(milliseconds), so the refusal names its exact token count; only longer ones are refused by the bound."""


class PromptChecks:
    """Length checks before tokenizing, and the tokenizer's worker threads."""

    def __init__(self, tokenizer: LlmcTokenizer, context_length: int, limiter: anyio.CapacityLimiter) -> None:
        """``limiter`` bounds the tokenizer calls at once (shared by the models of one server)."""
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.bound = length_bound(tokenizer)
        self.limiter = limiter

    def _room(self, max_tokens: int | None) -> int:
        """The most prompt tokens that leave room for ``max_tokens`` (None: at least one token; 0, a
        prompt only scored: the whole context). Never fewer than the engine's own check allows."""
        return self.context_length - (1 if max_tokens is None else max(max_tokens, 0))

    def check_text(self, text: str, max_tokens: int | None, what: str) -> None:
        """A 400 when ``text`` has more tokens than the context leaves, proved without tokenizing it."""
        bound = self.bound
        if bound is None:
            return
        if len(text) <= SHORT_TEXT_PER_TOKEN * self.context_length:
            return  # cheap to tokenize: the engine's check, with the exact count, decides
        room = self._room(max_tokens)
        if len(text) * UTF8_MAX <= room * bound.bytes_per_token:  # short enough, whatever its characters
            return
        least = bound.min_tokens(text)
        if least <= room:
            return
        wanted = "" if max_tokens is None else f", and max_tokens asks for {max_tokens} more"
        verb = "are" if what == "messages" else "is"
        raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, your "
                       f"{what} {verb} {utf8_length(text)} bytes long, at least {least} tokens (no token of this model "
                       f"spans more than {bound.bytes_per_token} bytes){wanted}. "
                       f"Please reduce the length of the {what}.", param=what, code="context_length_exceeded")

    def check_ids(self, ids: list[int], max_tokens: int | None, what: str) -> None:
        """The engine's context refusal for a token-id prompt, by its count alone (before decoding it)."""
        if len(ids) > self._room(max_tokens):
            raise refusal(ContextLengthError(len(ids), max_tokens, self.context_length), what)

    def check_decodable(self, ids: list[int], what: str) -> None:
        """The engine's token-id refusal, by the tokenizer's vocabulary, for ids about to be decoded
        (``echo``): the tokenizer overflows on ids below 0 or of 2^64 and more."""
        try:
            TokenIdError.check(ids, self.tokenizer.vocab_size)
        except TokenIdError as exc:
            raise refusal(exc, what) from exc

    async def encode(self, texts: list[str], max_tokens: int | None, what: str = "prompt") -> list[list[int]]:
        """Token ids of ``texts`` (with special tokens), each checked for length first."""
        for text in texts:
            self.check_text(text, max_tokens, what)
        return await self.run(self.tokenizer.encode_batch, texts)

    async def run(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` (tokenizer work: encoding, chat templates) in a worker thread, under the limit."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self.limiter)
