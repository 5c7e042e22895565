"""From the engine thread to the caller: a request's results delivered into a
:class:`concurrent.futures.Future` (:func:`future_sink`, for blocking callers) or into an
asyncio event loop (:class:`RequestStream`, for ``Engine.stream`` and the HTTP server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.requests import Sink


def future_sink(fut: concurrent.futures.Future[RequestOutput]) -> Sink:
    """A sink that resolves ``fut`` with the request's output (or its exception)."""

    def sink(item: StreamChunk | RequestOutput | BaseException) -> None:
        if fut.done():
            return
        if isinstance(item, BaseException):
            fut.set_exception(item)
        elif isinstance(item, RequestOutput):
            fut.set_result(item)

    return sink


class RequestStream:
    """The :class:`StreamChunk` s of one streamed request, as an async iterator in the event loop
    that created it.

    The engine thread calls :meth:`sink`, which hands each item to the loop with
    ``call_soon_threadsafe`` (and cancels the request when that loop is gone). The last chunk
    has ``finish_reason`` set; an exception that failed the request is raised by the iteration.
    :meth:`cancel` (or :meth:`aclose`) before the end cancels the request, which frees its KV blocks.
    """

    def __init__(self, request_id: str, cancel: Callable[[str], object]) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamChunk | RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def sink(self, item: StreamChunk | RequestOutput | BaseException) -> None:
        """Deliver ``item`` (called on the engine thread)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancel(self.request_id)

    @property
    def done(self) -> bool:
        """True once the last chunk or an error was taken, or after :meth:`cancel`."""
        return self._done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while not self._done:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if isinstance(item, StreamChunk):
                self._done = item.finish_reason is not None
                return item
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Cancel the request unless it has ended."""
        if not self._done:
            self._done = True
            self._cancel(self.request_id)

    async def aclose(self) -> None:
        self.cancel()
