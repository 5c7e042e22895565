"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Handlers registered by :func:`install_error_handlers` turn every failure into that body, so a
client library (``openai``) raises its usual exception types: 400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 500 ``InternalServerError``.
:func:`refusal` maps the engine's typed refusals (:mod:`llmc.runtime.errors`) to their status,
``param`` and ``code``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.compiler.errors import LlmcError
from llmc.runtime.errors import ContextLengthError, EngineClosedError, QueueFullError, TokenIdError
from llmc.runtime.structured import GrammarError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to return to the client with ``status`` in OpenAI's error format."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body OpenAI returns for an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return APIError(status, message, **kwargs).response()


def refusal(exc: LlmcError, what: str) -> APIError:
    """The response to the engine refusing a request at submission (a ``RequestError`` or
    :class:`EngineClosedError`); ``what`` names the prompt's field: ``"prompt"`` or ``"messages"``."""
    if isinstance(exc, EngineClosedError):
        return APIError(503, "the engine has stopped; restart the server", code="engine_stopped")
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is overloaded: {exc}; retry later", code="server_overloaded",
                        headers={"retry-after": "1"})
    if isinstance(exc, ContextLengthError):
        limit, prompt_len, max_tokens = exc.context_length, exc.prompt_tokens, exc.max_tokens
        if max_tokens is None:
            return APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                            f"is {prompt_len} tokens, which leaves no room for the completion.",
                            param=what, code="context_length_exceeded")
        return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                        f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} for the "
                        f"completion). Please reduce the length of the {what} or max_tokens.",
                        param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, GrammarError):
        return APIError(400, str(exc), param=exc.field, code="invalid_constraint")
    if isinstance(exc, TokenIdError) and what == "prompt":
        return APIError(400, str(exc), param="prompt")
    return APIError(400, str(exc))


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first offending field (malformed JSON included)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}",
                        code="invalid_json")
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "the request body must be a JSON object (send it with Content-Type: application/json)",
                        code="invalid_json")
    if first.get("type") == "missing":
        message = f"missing required parameter: {param!r}"
        code = "missing_required_parameter"
    elif param:
        message = f"invalid value for {param!r}: {msg}"
        code = "invalid_value"
    else:
        message = f"invalid request body: {msg}"
        code = "invalid_value"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to a response in OpenAI's error format."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(LlmcError)
    async def _llmc_error(request: Request, exc: LlmcError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        return error_response(status, message, headers=exc.headers)
