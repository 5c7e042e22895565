"""Run the sequences of one HTTP request on the engine: n choices per prompt, merged into one
stream of ``(choice index, Delta)``, with per-sequence metrics. Closing the stream (client gone)
cancels every sequence that has not finished."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio

from llmc.runtime.sampling import SamplingParams
from llmc.runtime.server.backend import Backend, Delta, SequenceStream, TokenLogprob
from llmc.runtime.server.metrics import ServerMetrics


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

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
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

    def __init__(self, backend: Backend, jobs: list[Job], request_id: str, metrics: ServerMetrics,
                 arrival: float | None = None) -> None:
        self.backend = backend
        self.jobs = jobs
        self.request_id = request_id
        self.metrics = metrics
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.timing = {job.index: _SequenceTiming(self.arrival) for job in jobs}
        self._queue: asyncio.Queue[tuple[int, Delta | BaseException | object]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._open: list[SequenceStream] = []

    def start(self) -> None:
        """Submit every sequence; a refusal (a full queue, an invalid request) raises here,
        before any response header is sent, after cancelling the sequences already submitted."""
        try:
            for job in self.jobs:
                stream = self.backend.open(job.prompt_ids, job.params, f"{self.request_id}-{job.index}")
                self._open.append(stream)
                self._tasks.append(asyncio.create_task(self._pump(job.index, stream)))
        except BaseException:
            for t in self.timing.values():
                t.finished = True  # refused, not aborted
            for task in self._tasks:
                task.cancel()
            for stream in self._open:
                stream.cancel()
            self._tasks.clear()
            self._open.clear()
            raise
        for job in self.jobs:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    async def _pump(self, index: int, stream: SequenceStream) -> None:
        try:
            async for delta in stream:
                self._record(index, delta)
                await self._queue.put((index, delta))
            await self._queue.put((index, _END))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            self.timing[index].finished = True  # failed, not aborted by the client
            self.metrics.finished.labels(finish_reason="error").inc()
            await self._queue.put((index, exc))

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
        remaining = len(self._tasks)
        while remaining:
            index, item = await self._queue.get()
            if item is _END:
                remaining -= 1
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
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for stream in self._open:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        aborted = sum(1 for t in self.timing.values() if not t.finished)
        if aborted and self._open:
            self.metrics.aborted.inc(aborted)
        self._tasks.clear()
        self._open.clear()
