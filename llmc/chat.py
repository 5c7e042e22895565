"""Conversations with an :class:`~llmc.runtime.engine.Engine`: the model's chat template, an optional
system prompt and a history kept within the context; and streaming from plain (non-async) code.

    from llmc import ChatSession, load

    with load("model.gguf") as engine:
        chat = ChatSession(engine, system="Answer in one sentence.")
        for piece in chat.send("Name the capital of France."):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.text import check_unicode
from llmc.runtime.engine import Engine
from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.sampling import SamplingParams

Prompt = str | list[int]


def stream_chunks(engine: Engine, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StreamChunk]:
    """The chunks of one request as they are generated, for code without an event loop. Leaving the
    loop early (``break``, an exception, Ctrl-C) cancels the request."""
    items: queue.Queue[Any] = queue.Queue()
    rid = engine.submit(prompt, params, items.put, streaming=True)
    finished = False
    try:
        while True:
            try:
                item = items.get(timeout=0.1)  # a timeout, so that Ctrl-C is seen while waiting
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                finished = True
                raise item
            if isinstance(item, StreamChunk):
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
    finally:
        if not finished:
            engine.cancel(rid)


@dataclass
class Turn:
    """What :meth:`ChatSession.prepare` decided for the next answer."""

    prompt_ids: list[int]
    params: SamplingParams
    dropped: int
    """Earlier messages left out so that the prompt and the answer fit the context."""


class ChatSession:
    """A conversation with one engine. The history holds finished turns only: an answer that was
    stopped (:meth:`send`'s loop left early) is not kept."""

    def __init__(self, engine: Engine, system: str | None = None, params: SamplingParams | None = None) -> None:
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            what = "no tokenizer" if tokenizer is None else "no chat template"
            raise LlmcError(f"this model has {what}, so it cannot chat; generate from a plain prompt with "
                            "`llmc run MODEL --prompt TEXT`")
        if system is not None:
            check_unicode(system, "the system prompt")
        self.engine = engine
        self.tokenizer = tokenizer
        self.system = system
        self.params = params or SamplingParams(max_tokens=512)
        self.history: list[dict[str, str]] = []
        self.last: RequestOutput | None = None

    @property
    def context(self) -> int:
        return int(self.engine.config.max_position)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def _messages(self, history: list[dict[str, str]], user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *history, {"role": "user", "content": user}]

    def prepare(self, user: str) -> Turn:
        """The next prompt: the oldest turns are dropped until the prompt and ``max_tokens`` fit the
        context; with no history left, ``max_tokens`` shrinks to what remains."""
        check_unicode(user, "the message")
        history = list(self.history)
        while True:
            ids = self.tokenizer.encode_chat(self._messages(history, user))
            room = self.context - len(ids)
            if room >= self.params.max_tokens:
                return Turn(ids, self.params, len(self.history) - len(history))
            if not history:
                break
            del history[:2]  # one user message and its answer
        if room < 1:
            raise RequestError(f"this message is {len(ids)} tokens with the chat template, which does not fit the "
                               f"context of {self.context} tokens")
        return Turn(ids, dataclasses.replace(self.params, max_tokens=room), len(self.history))

    def send(self, user: str, turn: Turn | None = None) -> Iterator[str]:
        """Stream the answer to ``user`` (``turn``: from :meth:`prepare`, to see what it dropped).
        The turn enters the history once the answer is complete; :attr:`last` is its output."""
        turn = turn or self.prepare(user)
        pieces: list[str] = []
        with contextlib.closing(stream_chunks(self.engine, turn.prompt_ids, turn.params)) as chunks:
            for chunk in chunks:  # leaving early closes the stream, which cancels the request
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
                if chunk.output is not None:
                    self.last = chunk.output
        if turn.dropped:
            del self.history[:turn.dropped]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces)}]
