"""From the engine thread to the caller: a request's results delivered into a
:class:`concurrent.futures.Future` (:func:`future_sink`, for blocking callers) or into an
asyncio event loop (:class:`RequestStream`, for ``Engine.stream`` and the HTTP server).

Streamed items reach their event loops in batches: :meth:`RequestStream.sink` only records the
item in the engine's :class:`StreamDelivery`, and the step loop calls :meth:`StreamDelivery.flush`
once a step (just before the next forward pass, and whenever it goes idle), which hands each event
loop all of its streams' new items with one ``call_soon_threadsafe``. With 32 streams that is one
wake-up of the loop a step instead of 32 (each a write to the loop's self-pipe, during which the
engine thread gives up the GIL and may wait for it to come back while the loop runs), and the loop
does its work while the forward pass runs without the GIL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.requests import Sink

Item = StreamChunk | RequestOutput | BaseException


def future_sink(fut: concurrent.futures.Future[RequestOutput]) -> Sink:
    """A sink that resolves ``fut`` with the request's output (or its exception)."""

    def sink(item: Item) -> None:
        if fut.done():
            return
        if isinstance(item, BaseException):
            fut.set_exception(item)
        elif isinstance(item, RequestOutput):
            fut.set_result(item)

    return sink


class StreamDelivery:
    """The items delivered to :class:`RequestStream` s since the last :meth:`flush`, per event loop.

    :meth:`put` may be called from any thread (the engine's, under its lock); :meth:`flush` (the
    engine thread) hands each loop its items, in the order they were put, with one
    ``call_soon_threadsafe``; a stream whose loop is closed has its request cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Item]]] = {}

    def put(self, stream: RequestStream, item: Item) -> None:
        with self._lock:
            items = self._pending.get(stream.loop)
            if items is None:
                self._pending[stream.loop] = [(stream, item)]
            else:
                items.append((stream, item))

    def pending(self) -> bool:
        """Whether some items wait for the next :meth:`flush`."""
        return bool(self._pending)

    def flush(self) -> None:
        """Hand every event loop the items put for it since the last flush."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for stream in {id(s): s for s, _ in items}.values():
                    stream.listener_gone()


def _dispatch(items: list[tuple[RequestStream, Item]]) -> None:
    for stream, item in items:
        try:
            stream.arrived(item)
        except Exception as exc:  # one consumer's bug must not keep the other streams' items from them
            stream.loop.call_exception_handler({"message": f"delivering to stream {stream.request_id}",
                                                "exception": exc})


class RequestStream:
    """The :class:`StreamChunk` s of one streamed request, as an async iterator in the event loop
    that created it.

    The engine thread calls :meth:`sink`; the items arrive in the loop in batches (see the module
    docstring). The last chunk has ``finish_reason`` set; an exception that failed the request is
    raised by the iteration. :meth:`cancel` (or :meth:`aclose`) before the end cancels the request,
    which frees its KV blocks. :meth:`forward` hands the items to a callback instead of the
    iteration (the server merges the sequences of one request that way, without a task each).
    """

    def __init__(self, request_id: str, cancel: Callable[[str], object], delivery: StreamDelivery) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self._cancel = cancel
        self._delivery = delivery
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._forward: Callable[[StreamChunk | BaseException], None] | None = None
        self._done = False

    def sink(self, item: Item) -> None:
        """Deliver ``item`` (called on the engine thread; it reaches the loop at the next flush)."""
        self._delivery.put(self, item)

    def listener_gone(self) -> None:
        """The event loop is closed: cancel the request (called on the engine thread)."""
        self._cancel(self.request_id)

    def arrived(self, item: Item) -> None:
        """An item reached the event loop (called in it, in delivery order)."""
        if self._forward is None:
            self._queue.put_nowait(item)
            return
        if self._done:
            return  # cancelled, or ended already
        if isinstance(item, BaseException):
            self._done = True
            self._forward(item)
        elif isinstance(item, StreamChunk):
            self._done = item.finish_reason is not None
            self._forward(item)

    def forward(self, callback: Callable[[StreamChunk | BaseException], None]) -> None:
        """Hand each later chunk, or the exception that failed the request, to ``callback`` in the
        event loop instead of the iteration; nothing more arrives after the last chunk, an exception
        or :meth:`cancel`. Call it before the loop runs again (right after ``open_stream``)."""
        assert self._queue.empty(), "forward() after items were queued for the iteration"
        self._forward = callback

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
