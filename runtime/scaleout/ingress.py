"""The scale-out ingress: the same OpenAI app as ``llmc serve`` (:func:`create_backend_app`) over
a :class:`RayBackend`, whose models run their requests on engine replicas through Ray Serve
handles (routed by :class:`~llmc.runtime.scaleout.router.PrefixAffinityRouter`).

Faults, as a client sees them:

- every replica of a model busy (Serve's queue for it full): 429 with ``Retry-After``; no replica
  takes the request within ``admission_timeout_s`` (all starting, or all gone): 503 with
  ``Retry-After``; a replica's engine refusing (its own queue full, a prompt over the context):
  the single-process server's answer, with ``x-llmc-replica``;
- a replica that dies before it admitted the request, or while a non-streamed request ran: the
  request is retried once on another replica (nothing reached the client yet), then 503;
- a replica that dies mid-stream: the stream ends with an error event (``code:
  "replica_failed"``) and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from tokenizers import Tokenizer

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.scaleout.metrics_hub import merge_metrics
from llmc.runtime.scaleout.wire import (
    REPLICA_HEADER,
    Admitted,
    Failed,
    Refused,
    RoutingInfo,
    prefix_hashes,
    refusal_error,
)
from llmc.runtime.server.errors import APIError
from llmc.runtime.server.generation import ChoiceResult, Delta, Job
from llmc.runtime.server.metrics import ServerMetrics
from llmc.runtime.server.tokens import TokenBytes
from llmc.runtime.structured import Constraint

logger = logging.getLogger("llmc.scaleout")

RETRY_AFTER = {"retry-after": "1"}


@dataclass
class ModelSpec:
    """What the ingress needs of a model without loading it: its id, artifact, tokenizer and context."""

    name: str
    artifact: str
    tokenizer_json: str
    tokenizer_meta: dict[str, Any]
    max_model_len: int
    deployment: str  # the Serve deployment of its engine replicas

    def tokenizer(self) -> LlmcTokenizer:
        return LlmcTokenizer(Tokenizer.from_str(self.tokenizer_json), TokenizerMeta(**self.tokenizer_meta))


class ReplicaError(RuntimeError):
    """A sequence failed on its replica (the replica's own error, as text)."""


class _ReplicaLost(Exception):
    def __init__(self, replica: str | None, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.replica = replica


class RemoteModel:
    """A model whose requests run on the replicas behind ``handle``."""

    def __init__(self, spec: ModelSpec, handle: Any, admission_timeout_s: float) -> None:
        self.spec = spec
        self.name = spec.name
        self.tokenizer = spec.tokenizer()
        self.token_bytes = TokenBytes(self.tokenizer)
        self.max_model_len = spec.max_model_len
        self.created = int(time.time())
        self.handle = handle.options(stream=True, method_name="generate")
        self.admission_timeout_s = admission_timeout_s

    def new_run(self, jobs: list[Job], request_id: str, arrival: float) -> RemoteRun:
        return RemoteRun(self, jobs, request_id)

    async def check_constraint(self, constraint: Constraint) -> None:
        """Nothing here: the replica compiles the constraint when it admits the run and refuses a
        bad one with the same :class:`~llmc.runtime.structured.GrammarError` (across the wire)."""


class RemoteRun:
    """One request's sequences on one replica (the :class:`~llmc.runtime.server.backend.Run` interface)."""

    def __init__(self, model: RemoteModel, jobs: list[Job], request_id: str) -> None:
        self.model = model
        self.jobs = jobs
        self.request_id = request_id
        self.headers: dict[str, str] = {}
        self.replica: str | None = None
        self._hashes = prefix_hashes(jobs[0].prompt_ids) if jobs else []
        self._arrival_wall = time.time()
        self._stream: Any = None

    # -- submission ------------------------------------------------------------------------
    async def start(self) -> None:
        await self._submit(avoid=[], may_retry=True)

    async def _submit(self, avoid: list[str], may_retry: bool) -> None:
        routing = RoutingInfo(self._hashes, avoid)
        stream = self.model.handle.remote(self.jobs, self.request_id, self._arrival_wall, routing=routing)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.model.admission_timeout_s)
        except BackPressureError as exc:
            stream.cancel()
            raise APIError(429, f"every replica of {self.model.name!r} is busy ({exc}); retry later",
                           code="server_overloaded", headers=RETRY_AFTER) from exc
        except asyncio.TimeoutError as exc:
            stream.cancel()
            raise APIError(503, f"no replica of {self.model.name!r} took the request within "
                           f"{self.model.admission_timeout_s:g} s (replicas starting or unavailable); retry later",
                           code="no_replica_available", headers=RETRY_AFTER) from exc
        except (RayActorError, StopAsyncIteration) as exc:
            if not may_retry:
                raise self._lost_error(routing.replica, exc, "before it took the request") from exc
            logger.warning("replica %s of %s died before admitting %s; retrying on another", routing.replica,
                           self.model.name, self.request_id)
            await self._submit([*avoid, *([routing.replica] if routing.replica else [])], may_retry=False)
            return
        except RayServeException as exc:
            stream.cancel()
            raise APIError(503, f"the deployment of {self.model.name!r} is unavailable: {exc}",
                           code="no_replica_available", headers=RETRY_AFTER) from exc
        if isinstance(first, Refused):
            self.headers[REPLICA_HEADER] = first.replica
            stream.cancel()
            raise refusal_error(first)
        assert isinstance(first, Admitted), first
        self.replica = first.replica
        self.headers[REPLICA_HEADER] = first.replica
        self._stream = stream

    def _lost_error(self, replica: str | None, cause: BaseException, when: str) -> APIError:
        return APIError(503, f"replica {replica or '?'} of {self.model.name!r} failed {when} "
                        f"({type(cause).__name__}); retry", code="replica_failed", headers=RETRY_AFTER)

    # -- results ---------------------------------------------------------------------------
    async def _items(self) -> AsyncIterator[tuple[int, Delta]]:
        while True:
            try:
                item = await self._stream.__anext__()
            except StopAsyncIteration:
                return
            except RayTaskError as exc:
                raise ReplicaError(str(exc)) from exc
            except (RayActorError, RayServeException) as exc:
                raise _ReplicaLost(self.replica, exc) from exc
            if isinstance(item, Failed):
                raise ReplicaError(item.message)
            for index, delta in item:
                yield index, delta

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        try:
            async for item in self._items():
                yield item
        except _ReplicaLost as lost:
            raise self._lost_error(lost.replica, lost.__cause__ or lost, "mid-stream") from lost

    async def collect(self) -> list[ChoiceResult]:
        """Every choice; a replica lost on the way is replaced once (nothing was sent yet)."""
        for attempt in (0, 1):
            results = {job.index: ChoiceResult(job.index, len(job.prompt_ids)) for job in self.jobs}
            try:
                async for index, delta in self._items():
                    results[index].add(delta)
                return [results[job.index] for job in self.jobs]
            except _ReplicaLost as lost:
                if attempt:
                    raise self._lost_error(lost.replica, lost.__cause__ or lost, "while generating") from lost
                logger.warning("replica %s of %s died running %s; retrying on another", lost.replica,
                               self.model.name, self.request_id)
                await self._submit([lost.replica] if lost.replica else [], may_retry=False)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.cancel()
            self._stream = None


class RayBackend:
    """The :class:`~llmc.runtime.server.backend.ServingBackend` of the ingress: several models,
    their replicas' metrics (through the hub) and their health."""

    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any], hub: Any, admission_timeout_s: float) -> None:
        self.metrics = ServerMetrics(dict)  # only its HTTP counters are exported; the replicas report the rest
        self.models: dict[str, Any] = {s.name: RemoteModel(s, handles[s.name], admission_timeout_s) for s in specs}
        self.hub = hub

    async def render_metrics(self) -> bytes:
        reports = await self.hub.snapshot.remote()
        return merge_metrics(self.metrics.registry, reports)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        reports = await self.hub.snapshot.remote()
        live: dict[str, list[str]] = {name: [] for name in self.models}
        for rep in reports:
            live.setdefault(rep.model, []).append(rep.replica)
        ok = all(live[name] for name in self.models)
        return ok, {"status": "ok" if ok else "no replica", "models": {n: {"replicas": sorted(r)} for n, r in
                                                                      live.items()}}
