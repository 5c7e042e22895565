"""ASGI middleware: API-key check, request limits (body size and time, requests in flight),
per-request metrics, and a last-resort 500.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmc.runtime.server.errors import error_body
from llmc.runtime.server.limits import SCOPE_KEY, Admission, AdmissionGate, ServerLimits
from llmc.runtime.server.metrics import ServerMetrics

logger = logging.getLogger("llmc.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DRAIN_BYTES = 64 * 2**20  # what is read and dropped of a body over the limit, so the client sees the 413
CLOSE = (b"connection", b"close")


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer KEY`` on every path except /health and /metrics."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is None:
            await _send_json(send, 401, error_body(
                "missing API key: send it as 'Authorization: Bearer KEY'", "authentication_error",
                code="missing_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        if not hmac.compare_digest(token.encode(), self.api_key):
            await _send_json(send, 401, error_body("incorrect API key", "authentication_error",
                                                   code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class RequestMetricsMiddleware:
    """Counts responses by endpoint and status; turns escaped exceptions into a logged 500."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                status = 500
                await _send_json(send, 500, error_body(f"internal server error: {type(exc).__name__}: {exc}",
                                                       "internal_server_error"))
        finally:
            path = scope["path"]
            endpoint = path if path in self.known_paths else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestLimitMiddleware:
    """Bounds what a request may hold: its body is read here, before anything parses it, up to
    ``max_request_bytes`` (413 beyond, in OpenAI's error format) and within ``body_timeout`` seconds
    (408); at most ``max_pending`` requests are read, parsed and tokenized at once (a request waits
    for a slot, without its body being read, up to ``body_timeout`` seconds, then gets 503). A
    request frees its slot when it reaches the engine (:func:`~llmc.runtime.server.limits.admitted`),
    when its response starts, or when it ends. GET, HEAD and OPTIONS requests pass untouched."""

    def __init__(self, app: ASGIApp, limits: ServerLimits, gate: AdmissionGate) -> None:
        self.app = app
        self.limits = limits
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit + DRAIN_BYTES:
            await self._too_large(send, declared)  # too much to drain: the client may see a reset instead
            return
        admission = await self.gate.enter(self.limits.body_timeout)
        if admission is None:
            await _send_json(send, 503, error_body(
                f"the server is busy: its {self.gate.limit} slots for requests being read and tokenized "
                f"(llmc serve --max-pending) stayed taken for {self.limits.body_timeout:g} s; retry later",
                "service_unavailable", code="server_busy"), [(b"retry-after", b"1")])
            return
        try:
            try:
                with anyio.fail_after(self.limits.body_timeout):
                    body = await self._read_body(receive, limit)
            except TimeoutError:
                await _send_json(send, 408, error_body(
                    f"the request body did not arrive within {self.limits.body_timeout:g} s", "invalid_request_error",
                    code="request_timeout"), [CLOSE])
                return
            except _BodyTooLarge:
                await self._too_large(send, declared)
                return
            except _ClientGone:
                return
            scope[SCOPE_KEY] = admission
            await self.app(scope, _replay(body, receive), _releasing(send, admission))
        finally:
            admission.release()

    async def _read_body(self, receive: Receive, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # read on and drop the rest (up to DRAIN_BYTES), then answer 413
                chunks.clear()
                if size > limit + DRAIN_BYTES:
                    raise _BodyTooLarge
            else:
                chunks.append(chunk)
            if not message.get("more_body", False):
                if size > limit:
                    raise _BodyTooLarge
                return b"".join(chunks)

    async def _too_large(self, send: Send, declared: int | None) -> None:
        size = f" ({declared} bytes)" if declared is not None else ""
        await _send_json(send, 413, error_body(
            f"the request body{size} is larger than the server's limit of {self.limits.max_request_bytes} bytes "
            f"(llmc serve --max-request-bytes)", "invalid_request_error", code="request_too_large"), [CLOSE])


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then what the connection says (a disconnect)."""
    pending: list[bytes] = [body]

    async def replayed() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replayed


def _releasing(send: Send, admission: Admission) -> Send:
    async def releasing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            admission.release()
        await send(message)

    return releasing_send
