"""What the HTTP app serves: one or more models behind a :class:`ServingBackend`.

The routes (:mod:`llmc.runtime.server.app`) are written once against these interfaces, so the
single-process server and the scale-out deployment (:mod:`llmc.runtime.scaleout`, Ray Serve) run
the same code for parsing, tokenization, chat templates, validation, errors, streaming and
formatting. They differ only in where a request's sequences run:

- :class:`LocalBackend`: one :class:`~llmc.runtime.engine.Engine` in this process; a run is a
  :class:`~llmc.runtime.server.generation.RequestRun` over it.
- the scale-out backend: engine replicas in other processes or nodes, reached through Ray Serve
  handles (a run there is a ``RemoteRun``; see :mod:`llmc.runtime.scaleout.ingress`).

A *run* is one request's sequences: ``await run.start()`` submits them (the engine's refusals raise
here, before any response header), then ``run.deltas()`` streams ``(choice index, Delta)`` or
``run.collect()`` returns the finished choices; ``await run.close()`` cancels what is left.
``run.headers`` are extra response headers (the scale-out backend names the replica that served).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from llmc.compiler.errors import LlmcError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.server.errors import APIError
from llmc.runtime.server.generation import ChoiceResult, Delta, Job, RequestRun
from llmc.runtime.server.metrics import CONTENT_TYPE, ServerMetrics
from llmc.runtime.server.tokens import TokenBytes
from llmc.runtime.structured import Constraint

__all__ = ["CONTENT_TYPE", "LocalBackend", "LocalModel", "Run", "ServedModel", "ServingBackend", "model_card"]


class Run(Protocol):
    """One request's sequences (see the module docstring)."""

    jobs: list[Job]
    request_id: str
    headers: dict[str, str]

    async def start(self) -> None: ...

    def deltas(self) -> AsyncIterator[tuple[int, Delta]]: ...

    async def collect(self) -> list[ChoiceResult]: ...

    async def close(self) -> None: ...


class ServedModel(Protocol):
    """One model id the server answers for: its tokenizer and where its requests run."""

    name: str
    tokenizer: LlmcTokenizer
    token_bytes: TokenBytes
    max_model_len: int
    created: int

    def new_run(self, jobs: list[Job], request_id: str, arrival: float) -> Run:
        """A run of ``jobs`` (not started); ``arrival`` is the request's ``time.perf_counter()``."""
        ...

    async def check_constraint(self, constraint: Constraint) -> None:
        """Compile ``constraint`` before the request starts, where the model can (raises
        :class:`~llmc.runtime.structured.GrammarError`); a model that cannot check it here refuses
        a bad one when the run starts, as the same error."""
        ...


class ServingBackend(Protocol):
    """The models of one server, its metrics and its health."""

    models: dict[str, ServedModel]
    metrics: ServerMetrics  # the HTTP request counters go here (RequestMetricsMiddleware)

    async def render_metrics(self) -> bytes:
        """The Prometheus text of ``/metrics``."""
        ...

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether every model can take requests, and the body of ``/health``."""
        ...


def model_card(model: ServedModel) -> dict[str, Any]:
    """The ``/v1/models`` entry of ``model``."""
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "llmc",
            "max_model_len": model.max_model_len}


def require_tokenizer(tokenizer: LlmcTokenizer | None, what: str) -> LlmcTokenizer:
    if tokenizer is None:
        raise LlmcError(f"{what} has no tokenizer; llmc serve needs one (compile a model that ships "
                        "tokenizer.json or a GGUF with its vocabulary)")
    return tokenizer


class LocalModel:
    """A model served by an engine in this process."""

    def __init__(self, engine: Any, name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.name = name
        self.tokenizer = require_tokenizer(engine.tokenizer, "the artifact")
        self.token_bytes = TokenBytes(self.tokenizer)
        self.max_model_len = int(engine.max_model_len)  # the engine's --max-model-len, else the model's context
        self.created = int(time.time())
        self.metrics = metrics

    def new_run(self, jobs: list[Job], request_id: str, arrival: float) -> RequestRun:
        return RequestRun(self.engine, jobs, request_id, self.metrics, arrival)

    async def check_constraint(self, constraint: Constraint) -> None:
        await run_in_threadpool(self.engine.check_constraint, constraint)


class LocalBackend:
    """One engine in this process (``llmc serve`` without ``--replicas``)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.metrics = ServerMetrics(lambda: engine.stats())  # looked up at each scrape
        self.model = LocalModel(engine, model_name, self.metrics)
        self.models: dict[str, ServedModel] = {model_name: self.model}

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        if not self.engine.is_alive():
            return False, {"status": "engine stopped", "model": self.model.name}
        return True, {"status": "ok", "model": self.model.name}


def unknown_model(model: str, served: list[str]) -> APIError:
    names = ", ".join(repr(n) for n in served)
    return APIError(404, f"the model {model!r} does not exist; this server serves {names}", param="model",
                    code="model_not_found")
