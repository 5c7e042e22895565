"""What one client may cost the server: request size, time to send a request, work in flight.

:class:`ServerLimits` holds the numbers (``llmc serve`` options); the middleware
(:class:`~llmc.runtime.server.middleware.RequestLimitMiddleware`) enforces the body size, the body
timeout and the number of requests between arrival and submission to the engine (reading, parsing,
tokenizing: :class:`AdmissionGate`); the connection protocol
(:mod:`llmc.runtime.server.connections`) the header and keep-alive timeouts; the prompt checks
(:mod:`llmc.runtime.server.prompts`) the length of prompts and the tokenizer's concurrency.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import anyio

from llmc.compiler.errors import LlmcError

MiB = 2**20


def _default_tokenizing() -> int:
    return max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class ServerLimits:
    """Limits on what a client may hold (the defaults suit one server on one machine).

    ``max_request_bytes``: a larger body is refused with 413 while it is read, before parsing.
    ``max_pending``: requests read, parsed and tokenized at once; more wait (up to ``body_timeout``,
    then 503) without their bodies being read. ``max_tokenizing``: tokenizer calls at once.
    ``header_timeout``: seconds a connection has to send a request's headers, after it opens or
    after its last response. ``body_timeout``: seconds to send the whole body. ``keep_alive_timeout``:
    seconds an idle connection is kept between requests.
    """

    max_request_bytes: int = 8 * MiB
    max_pending: int = 64
    max_tokenizing: int = field(default_factory=_default_tokenizing)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_pending", "max_tokenizing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlmcError(f"{name} must be a positive integer, got {value!r}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                      and value > 0):
                raise LlmcError(f"{name} must be a positive number of seconds, got {value!r}")


class AdmissionGate:
    """At most ``limit`` requests between arrival and submission to the engine."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = anyio.Semaphore(limit)

    @property
    def pending(self) -> int:
        """Requests holding a slot now."""
        return self.limit - self._slots.value

    async def enter(self, timeout: float) -> Admission | None:
        """A slot, or None when none came free within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            await self._slots.acquire()
            return Admission(self._slots)
        return None


class Admission:
    """A request's slot in the :class:`AdmissionGate`; :meth:`release` gives it back (once)."""

    def __init__(self, slots: anyio.Semaphore) -> None:
        self._slots: anyio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


SCOPE_KEY = "llmc.admission"


def admitted(scope: dict[str, object]) -> None:
    """The request of ``scope`` has reached the engine (or been refused): free its slot."""
    admission = scope.get(SCOPE_KEY)
    if isinstance(admission, Admission):
        admission.release()
