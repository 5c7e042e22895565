"""Connections that cannot be held open for nothing.

uvicorn closes an idle keep-alive connection only after a response (``timeout_keep_alive``), and
any byte the client sends cancels that timer: a client that opens a connection and sends nothing,
or trickles its request headers, would hold it forever. :func:`timed_h11_protocol` makes uvicorn's
h11 protocol close a connection that has not sent a whole request's headers within
``header_timeout`` seconds of opening or of its last response. (The body's time is bounded by
:class:`~llmc.runtime.server.middleware.RequestLimitMiddleware`; HTTP/1.1 over h11 runs one request
at a time per connection, pipelined ones waiting unread.)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (``header_timeout``)."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # first: a pipelined request that the call below starts is a new cycle
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._awaited = self.cycle  # the request whose successor the connection owes
        self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self.cycle is not self._awaited or self.transport.is_closing():
            return  # a request arrived in time
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def timed_h11_protocol(header_timeout: float) -> type[TimedH11Protocol]:
    """The protocol class to give uvicorn (``http=``) for this ``header_timeout``."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})
