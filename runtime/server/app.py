"""The FastAPI application: OpenAI-compatible routes over a serving backend.

``create_app(engine, model_name=...)`` builds it over one engine in this process; ``llmc serve``
runs it with uvicorn. :func:`create_backend_app` builds the same routes over any
:class:`~llmc.runtime.server.backend.ServingBackend` (the scale-out deployment passes engine
replicas reached through Ray Serve), so both deployments share every route.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmc.compiler.errors import LlmcError, RequestError
from llmc.runtime.errors import EngineClosedError
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.server.backend import LocalBackend, Run, ServedModel, ServingBackend, model_card, unknown_model
from llmc.runtime.server.errors import APIError, error_body, install_error_handlers, refusal
from llmc.runtime.server.formatting import DONE, Formatter, sse
from llmc.runtime.server.generation import ChoiceResult, Delta, Job
from llmc.runtime.server.limits import AdmissionGate, ServerLimits, admitted
from llmc.runtime.server.metrics import CONTENT_TYPE
from llmc.runtime.server.middleware import ApiKeyMiddleware, RequestLimitMiddleware, RequestMetricsMiddleware
from llmc.runtime.server.prompts import PromptChecks
from llmc.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, _GenerationRequest
from llmc.runtime.server.structured import check_constraint, request_constraint
from llmc.runtime.server.tools import ToolStreamParser, tool_format_for
from llmc.runtime.structured import Constraint

logger = logging.getLogger("llmc.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_CLOSED = 499  # status recorded when the client went away before the response

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


class ServerState:
    """What the routes share: the backend's models (each through its public API only) and metrics."""

    def __init__(self, backend: ServingBackend, limits: ServerLimits | None = None) -> None:
        if not backend.models:
            raise LlmcError("a server needs at least one model")
        self.backend = backend
        self.models = backend.models
        self.default_model = next(iter(self.models.values()))
        self.metrics = backend.metrics
        self.limits = limits or ServerLimits()
        self.gate = AdmissionGate(self.limits.max_pending)
        limiter = anyio.CapacityLimiter(self.limits.max_tokenizing)  # one for all the models' tokenizers
        self.prompts = {name: PromptChecks(m.tokenizer, m.max_model_len, limiter) for name, m in self.models.items()}

    def check_model(self, model: str | None) -> ServedModel:
        """The model a request names (without ``model``: the first one served); 404 if unknown."""
        if model is None:
            return self.default_model
        served = self.models.get(model)
        if served is None:
            raise unknown_model(model, list(self.models))
        return served


class EventStreamResponse(StreamingResponse):
    """Server-sent events; the event iterator is always closed at the end, so a client that
    disconnects mid-stream cancels its generation at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self._events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it and raise :class:`ClientDisconnected` if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    finished = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not finished:
        raise ClientDisconnected
    return task.result()


def _sampling(req: _GenerationRequest, max_tokens: int | None, seed: int | None, logprobs: int | None,
              prompt_logprobs: int | None = None, constraint: Constraint | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=seed,
            stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            constraint=constraint,
        )
    except LlmcError as exc:
        raise APIError(400, str(exc)) from exc


def _jobs(req: _GenerationRequest, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
          prompt_logprobs: int | None = None, constraint: Constraint | None = None) -> list[Job]:
    """``req.n`` sequences per prompt; ``max_tokens=None`` generates up to the end of the context."""
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(req.n):
            seed = None if req.seed is None else (req.seed + i) % 2**64  # OpenAI seeds may be negative
            params = _sampling(req, max_tokens, seed, logprobs, prompt_logprobs, constraint)
            jobs.append(Job(p * req.n + i, ids, params))
    return jobs


async def _respond(request: Request, run: Run, what: str, build: Callable[[list[ChoiceResult]], dict[str, Any]],
                   events: Callable[[], AsyncIterator[bytes]] | None) -> Response:
    """Start the run (the engine's refusals become errors in OpenAI's format; ``what`` names the
    prompt's field); then stream ``events()`` (when given) or answer ``build(results)`` as JSON."""
    try:
        await run.start()
    except (RequestError, EngineClosedError) as exc:
        error = refusal(exc, what)
        error.headers = {**(error.headers or {}), **run.headers}
        raise error from exc
    finally:
        admitted(request.scope)  # the request no longer counts against max_pending
    if events is not None:
        return EventStreamResponse(_guarded(events(), run), run.headers)
    try:
        results = await _unless_disconnected(request, run.collect())
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        await run.close()
    return JSONResponse(build(results), headers=run.headers)


async def _guarded(events: AsyncIterator[bytes], run: Run) -> AsyncIterator[bytes]:
    """Stream events; errors after the headers go in-band as an error event; always close the run."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(exc.body())
        yield DONE
    except Exception as exc:
        logger.exception("error while streaming %s", run.request_id)
        yield sse(error_body(f"internal server error: {type(exc).__name__}: {exc}", "internal_server_error"))
        yield DONE
    finally:
        await run.close()


def create_app(engine: Any, *, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``engine`` (an :class:`llmc.runtime.engine.Engine`, or any
    object with its public API: ``tokenizer``, ``config``, ``open_stream``, ``stats``, ``is_alive``);
    ``limits`` bound what one client may hold (the defaults of :class:`ServerLimits` otherwise)."""
    return create_backend_app(LocalBackend(engine, model_name), api_key=api_key, limits=limits)


def create_backend_app(backend: ServingBackend, *, api_key: str | None = None,
                       limits: ServerLimits | None = None) -> FastAPI:
    """The same OpenAI-compatible app over any :class:`~llmc.runtime.server.backend.ServingBackend`
    (several models, routed by the request's ``model``)."""
    state = ServerState(backend, limits)
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmc = state
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, body = await backend.health()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await backend.render_metrics(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in state.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return model_card(state.check_model(model_id))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    known = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
    app.add_middleware(RequestLimitMiddleware, limits=state.limits, gate=state.gate)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, known_paths=known)
    return app


async def _completions(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    model = state.check_model(body.model)
    tokenizer = model.tokenizer
    checks = state.prompts[model.name]
    raw = body.prompts()
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    if isinstance(raw[0], str):
        texts: list[str] = raw  # type: ignore[assignment]
        prompts = await checks.encode(texts, max_tokens)
    else:
        prompts = raw  # type: ignore[assignment]
        for ids in prompts:
            checks.check_ids(ids, max_tokens, "prompt")
            if body.echo:
                checks.check_decodable(ids, "prompt")
        texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts] if body.echo else []
    constraint = request_constraint(body)
    await check_constraint(model, constraint)
    # echo with logprobs scores the prompt in its prefill; max_tokens 0 only scores it
    score_prompt = body.echo and body.logprobs is not None
    prompt_logprobs = body.logprobs if score_prompt else (0 if max_tokens == 0 else None)
    jobs = _jobs(body, prompts, max_tokens, body.logprobs, prompt_logprobs, constraint)
    run = model.new_run(jobs, f"cmpl-{uuid.uuid4().hex}", arrival)
    fmt = Formatter(run.request_id, model.name, model.token_bytes)
    prompt_tokens = sum(len(p) for p in prompts)
    echo = [texts[j.index // body.n] for j in run.jobs] if body.echo else None
    scored_ids = [j.prompt_ids for j in run.jobs] if score_prompt else None

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return fmt.completion(results, prompt_tokens, body.logprobs, echo, scored_ids)

    async def events() -> AsyncIterator[bytes]:
        offsets = {j.index: 0 for j in run.jobs}
        generated = 0
        for j in run.jobs if echo and not score_prompt else ():
            yield sse(fmt.completion_chunk(j.index, Delta("", []), None, 0, text=echo[j.index],
                                           include_usage=body.include_usage))
        async for index, delta in run.deltas():
            generated += len(delta.token_ids)
            if echo and scored_ids is not None and delta.prompt_logprobs is not None:  # the echo leads, scored
                assert body.logprobs is not None
                head = fmt.prompt_logprobs(scored_ids[index], delta.prompt_logprobs, body.logprobs)
                yield sse(fmt.completion_chunk(index, Delta("", []), body.logprobs, 0, text=echo[index],
                                               include_usage=body.include_usage, logprobs=head))
                offsets[index] = fmt.text_length(scored_ids[index])
            if delta.finish_reason is None and body.logprobs is None:
                if delta.text:  # the common chunk: new text only
                    yield fmt.text_event(index, delta.text, chat=False, include_usage=body.include_usage)
            elif delta.text or delta.finish_reason is not None or delta.token_ids:
                yield sse(fmt.completion_chunk(index, delta, body.logprobs, offsets[index],
                                               include_usage=body.include_usage))
            offsets[index] += fmt.text_length(delta.token_ids)
        if body.include_usage:
            yield sse(fmt.usage_chunk("text_completion", prompt_tokens, generated))
        yield DONE

    return await _respond(request, run, "prompt", build, events if body.stream else None)


async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    model = state.check_model(body.model)
    tools = tool_format_for(model.tokenizer)
    prompts = state.prompts[model.name]
    try:
        text = await prompts.run(tools.render_text, body)
    except LlmcError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    prompts.check_text(text, body.completion_limit(), "messages")
    prompt = await prompts.run(partial(model.tokenizer.encode, add_special_tokens=False), text)
    constraint = request_constraint(body)
    if body.forces_tool_call:
        assert body.tools is not None
        name = body.tool_choice_name
        called = body.tools if name == "required" else [t for t in body.tools if t.function.name == name]
        constraint = tools.constraint(called, body.parallel_tool_calls)
    await check_constraint(model, constraint)
    tools_on = bool(body.tools) and body.tool_choice_name != "none"
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    # without max_tokens the completion may fill the rest of the context (SamplingParams(max_tokens=None))
    run = model.new_run(_jobs(body, [prompt], body.completion_limit(), top_n, None, constraint),
                        f"chatcmpl-{uuid.uuid4().hex}", arrival)
    fmt = Formatter(run.request_id, model.name, model.token_bytes)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return fmt.chat(results, len(prompt), top_n, tools.parse if tools_on else None)

    async def events() -> AsyncIterator[bytes]:
        usage_null = body.include_usage  # with include_usage, every chunk but the last has "usage": null
        parsers: dict[int, ToolStreamParser] = {j.index: tools.stream_parser() for j in run.jobs} if tools_on else {}
        num_calls = {j.index: 0 for j in run.jobs}
        for j in run.jobs:
            yield sse(fmt.chat_chunk(j.index, {"role": "assistant", "content": ""}, include_usage=usage_null))
        generated = 0
        async for index, delta in run.deltas():
            generated += len(delta.token_ids)
            text, calls = delta.text, []
            if index in parsers:
                found = parsers[index].feed(delta.text)
                if delta.finish_reason is not None:
                    rest = parsers[index].finish()
                    found.content += rest.content
                    found.calls += rest.calls
                text, calls = found.content, found.calls
            if top_n is None:
                if text:  # the common chunk: new content only
                    yield fmt.text_event(index, text, chat=True, include_usage=usage_null)
            elif text or delta.token_ids:
                lp = fmt.chat_logprobs(delta.logprobs or [], top_n)
                yield sse(fmt.chat_chunk(index, {"content": text}, logprobs=lp, include_usage=usage_null))
            for call in calls:  # a call's header, then its arguments
                k = num_calls[index]
                num_calls[index] += 1
                head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                yield sse(fmt.chat_chunk(index, {"tool_calls": [head]}, include_usage=usage_null))
                args = {"index": k, "function": {"arguments": call.arguments}}
                yield sse(fmt.chat_chunk(index, {"tool_calls": [args]}, include_usage=usage_null))
            if delta.finish_reason is not None:
                finish = "tool_calls" if num_calls[index] else delta.finish_reason
                yield sse(fmt.chat_chunk(index, {}, finish_reason=finish, include_usage=usage_null))
        if body.include_usage:
            yield sse(fmt.usage_chunk("chat.completion.chunk", len(prompt), generated))
        yield DONE

    return await _respond(request, run, "messages", build, events if body.stream else None)
