"""ASGI middleware: API-key check, per-request metrics, and a last-resort 500.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmc.runtime.server.errors import error_body
from llmc.runtime.server.metrics import ServerMetrics

logger = logging.getLogger("llmc.server")

OPEN_PATHS = frozenset({"/health", "/metrics"})


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
