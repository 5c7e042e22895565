"""Run the sequences of one HTTP request on the engine: n choices per prompt, merged into one
stream of ``(choice index, Delta)``, with per-sequence metrics. Closing the stream (client gone)
cancels every sequence that has not finished.

Each sequence is submitted with ``engine.open_stream`` (so a full queue or an invalid request
raises before any response header goes out) and arrives through the engine's asyncio bridge
(:class:`llmc.runtime.bridge.RequestStream`); cancelling it frees its KV blocks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from llmc.runtime.bridge import RequestStream
from llmc.runtime.outputs import StreamChunk
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.server.metrics import ServerMetrics


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
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """On a sequence's first delta when prompt logprobs were asked for: one per prompt token."""


def _logprob(lp: Any) -> TokenLogprob:
    return TokenLogprob(int(lp.token_id), float(lp.logprob), [(int(t), float(v)) for t, v in lp.top])


def to_delta(chunk: StreamChunk) -> Delta:
    """One engine :class:`~llmc.runtime.outputs.StreamChunk` as a :class:`Delta`."""
    logprobs = [_logprob(lp) for lp in chunk.logprobs] if chunk.logprobs is not None else None
    prompt = None
    if chunk.prompt_logprobs is not None:
        prompt = [None if lp is None else _logprob(lp) for lp in chunk.prompt_logprobs]
    return Delta(chunk.text or "", [int(t) for t in chunk.token_ids], logprobs, chunk.finish_reason, prompt)


@dataclass
class Job:
    """One sequence to generate: choice ``index`` of the response."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceResult:
    """A finished sequence, accumulated from its deltas."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class _SequenceTiming:
    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.generated = 0
        self.finished = False


_END = object()


class RequestRun:
    """The sequences of one request, running concurrently on the engine."""

    def __init__(self, engine: Any, jobs: list[Job], request_id: str, metrics: ServerMetrics,
                 arrival: float | None = None) -> None:
        self.engine = engine
        self.jobs = jobs
        self.request_id = request_id
        self.metrics = metrics
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.timing = {job.index: _SequenceTiming(self.arrival) for job in jobs}
        self._queue: asyncio.Queue[tuple[int, Delta | BaseException | object]] = asyncio.Queue()
        self._open: list[RequestStream] = []
        self._remaining = 0  # sequences whose last chunk has not been taken
        self.headers: dict[str, str] = {}  # extra response headers (none for a local engine)

    async def start(self) -> None:
        """Submit every sequence; a refusal (a full queue, an invalid request) raises here,
        before any response header is sent, after cancelling the sequences already submitted."""
        try:
            for job in self.jobs:
                stream = self.engine.open_stream(None, job.params, request_id=f"{self.request_id}-{job.index}",
                                                 prompt_ids=job.prompt_ids)
                self._open.append(stream)
                stream.forward(partial(self._arrived, job.index))
        except BaseException:
            for t in self.timing.values():
                t.finished = True  # refused, not aborted
            for stream in self._open:
                stream.cancel()
            self._open.clear()
            raise
        self._remaining = len(self._open)
        for job in self.jobs:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _arrived(self, index: int, item: StreamChunk | BaseException) -> None:
        """A sequence's chunk (or the error that failed it), in the event loop, in order."""
        if isinstance(item, BaseException):  # delivered to the consumer, which re-raises it
            self.timing[index].finished = True  # failed, not aborted by the client
            self.metrics.finished.labels(finish_reason="error").inc()
            self._queue.put_nowait((index, item))
            return
        delta = to_delta(item)
        self._record(index, delta)
        self._queue.put_nowait((index, delta))
        if item.finish_reason is not None:
            self._queue.put_nowait((index, _END))

    def _record(self, index: int, delta: Delta) -> None:
        t = self.timing[index]
        now = time.perf_counter()
        if delta.token_ids:
            if t.first is None:
                t.first = now
            t.last = now
            t.generated += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
        if delta.finish_reason is not None and not t.finished:
            t.finished = True
            self.metrics.finished.labels(finish_reason=delta.finish_reason).inc()
            self.metrics.observe_sequence(arrival=t.arrival, first_token=t.first, last_token=t.last,
                                          generated=t.generated)

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """Every sequence's deltas as they come, until all have finished."""
        while self._remaining:
            index, item = await self._queue.get()
            if item is _END:
                self._remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, Delta)
                yield index, item

    async def collect(self) -> list[ChoiceResult]:
        """Wait for every sequence and return them in choice order."""
        results = {job.index: ChoiceResult(job.index, len(job.prompt_ids)) for job in self.jobs}
        async for index, delta in self.deltas():
            results[index].add(delta)
        return [results[job.index] for job in self.jobs]

    async def close(self) -> None:
        """Cancel what is still running (the engine frees its KV blocks) and wait for it.

        Shielded: it also completes when called from a cancelled task (a client that left)."""
        with anyio.CancelScope(shield=True):
            for stream in self._open:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        aborted = sum(1 for t in self.timing.values() if not t.finished)
        if aborted and self._open:
            self.metrics.aborted.inc(aborted)
        self._open.clear()
