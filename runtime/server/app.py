"""The FastAPI application: OpenAI-compatible routes over one engine.

``create_app(engine, model_name=...)`` builds it; ``llmc serve`` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.errors import EngineClosedError
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.server.errors import APIError, error_body, install_error_handlers, refusal
from llmc.runtime.server.formatting import DONE, Formatter, sse
from llmc.runtime.server.generation import ChoiceResult, Delta, Job, RequestRun
from llmc.runtime.server.metrics import CONTENT_TYPE, ServerMetrics
from llmc.runtime.server.middleware import ApiKeyMiddleware, RequestMetricsMiddleware
from llmc.runtime.server.protocol import ChatCompletionRequest, CompletionRequest, _GenerationRequest
from llmc.runtime.server.tokens import TokenBytes

logger = logging.getLogger("llmc.server")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_CLOSED = 499  # status recorded when the client went away before the response

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


class ServerState:
    """What the routes share: the engine (through its public API only), metrics and names."""

    def __init__(self, engine: Any, model_name: str) -> None:
        if engine.tokenizer is None:
            raise LlmcError("the artifact has no tokenizer; llmc serve needs one (compile a model that ships "
                            "tokenizer.json or a GGUF with its vocabulary)")
        self.engine = engine
        self.tokenizer: LlmcTokenizer = engine.tokenizer
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.engine_stats)
        self.token_bytes = TokenBytes(self.tokenizer)

    def engine_stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmc",
                "max_model_len": int(self.engine.config.max_position)}


class EventStreamResponse(StreamingResponse):
    """Server-sent events; the event iterator is always closed at the end, so a client that
    disconnects mid-stream cancels its generation at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
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


def _sampling(req: _GenerationRequest, max_tokens: int | None, seed: int | None,
              logprobs: int | None) -> SamplingParams:
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
        )
    except LlmcError as exc:
        raise APIError(400, str(exc)) from exc


def _jobs(req: _GenerationRequest, prompts: list[list[int]], max_tokens: int | None,
          logprobs: int | None) -> list[Job]:
    """``req.n`` sequences per prompt; ``max_tokens=None`` generates up to the end of the context."""
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(req.n):
            seed = None if req.seed is None else (req.seed + i) % 2**64  # OpenAI seeds may be negative
            jobs.append(Job(p * req.n + i, ids, _sampling(req, max_tokens, seed, logprobs)))
    return jobs


async def _respond(request: Request, run: RequestRun, what: str, build: Callable[[list[ChoiceResult]], dict[str, Any]],
                   events: Callable[[], AsyncIterator[bytes]] | None) -> Response:
    """Start the run (the engine's refusals become errors in OpenAI's format; ``what`` names the
    prompt's field); then stream ``events()`` (when given) or answer ``build(results)`` as JSON."""
    try:
        run.start()
    except (RequestError, EngineClosedError) as exc:
        raise refusal(exc, what) from exc
    if events is not None:
        return EventStreamResponse(_guarded(events(), run))
    try:
        results = await _unless_disconnected(request, run.collect())
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        await run.close()
    return JSONResponse(build(results))


async def _guarded(events: AsyncIterator[bytes], run: RequestRun) -> AsyncIterator[bytes]:
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


def create_app(engine: Any, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``engine`` (an :class:`llmc.runtime.engine.Engine`, or any
    object with its public API: ``tokenizer``, ``config``, ``open_stream``, ``stats``, ``is_alive``)."""
    state = ServerState(engine, model_name)
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmc = state
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.engine.is_alive():
            return JSONResponse({"status": "engine stopped", "model": state.model_name}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return state.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    known = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, known_paths=known)
    return app


async def _completions(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state.check_model(body.model)
    tokenizer = state.tokenizer
    raw = body.prompts()
    if isinstance(raw[0], str):
        texts: list[str] = raw  # type: ignore[assignment]
        prompts = await run_in_threadpool(tokenizer.encode_batch, texts)
    else:
        prompts = raw  # type: ignore[assignment]
        texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts] if body.echo else []
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    run = RequestRun(state.engine, _jobs(body, prompts, max_tokens, body.logprobs), f"cmpl-{uuid.uuid4().hex}",
                     state.metrics, arrival)
    fmt = Formatter(run.request_id, state.model_name, state.token_bytes)
    prompt_tokens = sum(len(p) for p in prompts)
    echo = [texts[j.index // body.n] for j in run.jobs] if body.echo else None

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return fmt.completion(results, prompt_tokens, body.logprobs, echo)

    async def events() -> AsyncIterator[bytes]:
        offsets = {j.index: 0 for j in run.jobs}
        generated = 0
        for j in run.jobs if echo else ():
            yield sse(fmt.completion_chunk(j.index, Delta("", []), None, 0, text=echo[j.index],
                                           include_usage=body.include_usage))
        async for index, delta in run.deltas():
            generated += len(delta.token_ids)
            if delta.text or delta.finish_reason is not None or body.logprobs is not None:
                yield sse(fmt.completion_chunk(index, delta, body.logprobs, offsets[index],
                                               include_usage=body.include_usage))
            offsets[index] += sum(len(state.token_bytes.text_of(t)) for t in delta.token_ids)
        if body.include_usage:
            yield sse(fmt.usage_chunk("text_completion", prompt_tokens, generated))
        yield DONE

    return await _respond(request, run, "prompt", build, events if body.stream else None)


async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    arrival = time.perf_counter()
    state.check_model(body.model)
    tokenizer = state.tokenizer

    def render() -> list[int]:
        text = tokenizer.apply_chat_template(body.chat_messages(), add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    try:
        prompt = await run_in_threadpool(render)
    except LlmcError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    # without max_tokens the completion may fill the rest of the context (SamplingParams(max_tokens=None))
    run = RequestRun(state.engine, _jobs(body, [prompt], body.completion_limit(), top_n),
                     f"chatcmpl-{uuid.uuid4().hex}", state.metrics, arrival)
    fmt = Formatter(run.request_id, state.model_name, state.token_bytes)

    def build(results: list[ChoiceResult]) -> dict[str, Any]:
        return fmt.chat(results, len(prompt), top_n)

    async def events() -> AsyncIterator[bytes]:
        usage_null = body.include_usage  # with include_usage, every chunk but the last has "usage": null
        for j in run.jobs:
            yield sse(fmt.chat_chunk(j.index, {"role": "assistant", "content": ""}, include_usage=usage_null))
        generated = 0
        async for index, delta in run.deltas():
            generated += len(delta.token_ids)
            if delta.text or (delta.token_ids and top_n is not None):
                lp = fmt.chat_logprobs(delta.logprobs or [], top_n) if top_n is not None else None
                yield sse(fmt.chat_chunk(index, {"content": delta.text}, logprobs=lp, include_usage=usage_null))
            if delta.finish_reason is not None:
                yield sse(fmt.chat_chunk(index, {}, finish_reason=delta.finish_reason, include_usage=usage_null))
        if body.include_usage:
            yield sse(fmt.usage_chunk("chat.completion.chunk", len(prompt), generated))
        yield DONE

    return await _respond(request, run, "messages", build, events if body.stream else None)
