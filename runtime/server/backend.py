"""The server's view of the engine: the one module that knows :class:`llmc.runtime.engine.Engine`'s API.

A sequence is admitted synchronously with ``engine.submit`` (so a full queue or an invalid
request is an HTTP error before any response header goes out); its chunks arrive from the
engine thread through ``call_soon_threadsafe`` into an asyncio queue; closing the
:class:`SequenceStream` before it ends calls ``engine.cancel``, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.server.errors import APIError


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the most likely alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New output of one sequence: text, token ids, their logprobs, and how it ended (last chunk)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


def to_delta(chunk: Any) -> Delta:
    """One engine :class:`~llmc.runtime.outputs.StreamChunk` as a :class:`Delta`."""
    logprobs = None
    if chunk.logprobs is not None:
        logprobs = [TokenLogprob(int(lp.token_id), float(lp.logprob), [(int(t), float(v)) for t, v in lp.top])
                    for lp in chunk.logprobs]
    return Delta(chunk.text or "", [int(t) for t in chunk.token_ids], logprobs, chunk.finish_reason)


class SequenceStream:
    """The deltas of one submitted sequence; :meth:`aclose` cancels it if it has not ended."""

    def __init__(self, engine: Any, request_id: str, queue: asyncio.Queue[Any]) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self._done = False

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        delta = to_delta(item)
        if delta.finish_reason is not None:
            self._done = True
        return delta

    def cancel(self) -> None:
        """Cancel the sequence unless it has ended (the engine frees its KV blocks)."""
        if not self._done:
            self._done = True
            self.engine.cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()


class Backend:
    """Wraps an engine for the HTTP layer."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        if engine.tokenizer is None:
            raise LlmcError("the artifact has no tokenizer; llmc serve needs one (compile a model that ships "
                            "tokenizer.json or a GGUF with its vocabulary)")
        self.tokenizer: LlmcTokenizer = engine.tokenizer
        self.max_context = int(engine.config.max_position)
        self.vocab_size = int(engine.config.vocab_size)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def alive(self) -> bool:
        """Whether the engine's step loop still runs (engines without one count as alive)."""
        thread = getattr(self.engine, "_thread", None)
        return thread is None or thread.is_alive()

    def open(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> SequenceStream:
        """Submit one sequence (raises :class:`APIError` 429/400 when the engine refuses it)."""
        from llmc.runtime.engine import QueueFullError

        if not self.alive():
            raise APIError(503, "the engine has stopped; restart the server", code="engine_stopped")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody listens any more
                self.engine.cancel(request_id)

        try:
            self.engine.submit(None, params, sink, request_id=request_id, streaming=True, prompt_ids=prompt_ids)
        except QueueFullError as exc:
            raise APIError(429, f"the server is overloaded: {exc}; retry later", code="server_overloaded",
                           headers={"retry-after": "1"}) from exc
        except RequestError as exc:
            raise APIError(400, str(exc)) from exc
        return SequenceStream(self.engine, request_id, queue)
