"""One engine replica: an :class:`~llmc.runtime.engine.Engine` in a Ray Serve replica process.

``generate`` runs a request's sequences with the same
:class:`~llmc.runtime.server.generation.RequestRun` the single-process server uses (and records the
same per-sequence metrics into the replica's own registry), streaming the items of
:mod:`llmc.runtime.scaleout.wire`. Cancelling the call (the client left, the ingress gave up)
cancels the sequences and frees their KV blocks. Serve calls ``check_health``: an engine whose
step loop has stopped makes the replica unhealthy, and Serve replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from llmc.compiler.errors import RequestError
from llmc.runtime.errors import EngineClosedError
from llmc.runtime.scaleout.wire import Admitted, Failed, Refused, RoutingInfo, refused
from llmc.runtime.server.generation import Delta, Job, RequestRun
from llmc.runtime.server.metrics import ServerMetrics

logger = logging.getLogger("llmc.scaleout")


def _arrival(arrival_wall: float) -> float:
    """The ingress's arrival time on this process's ``perf_counter`` clock (wall clocks of the
    nodes are assumed in sync; a clock ahead of ours counts as now)."""
    return time.perf_counter() - max(0.0, time.time() - arrival_wall)


async def _coalesced(deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[list[tuple[int, Delta]]]:
    """The deltas in lists of what is ready at once (one Ray message per list, not per token)."""
    queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in deltas:
                queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            batch: list[tuple[int, Delta]] = []
            item = await queue.get()
            while True:
                if item is None or isinstance(item, BaseException):
                    if batch:
                        yield batch
                    if item is None:
                        return
                    raise item
                batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            yield batch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class EngineReplica:
    """The body of the engine deployment (``serve.deployment`` is applied in
    :mod:`llmc.runtime.scaleout.application`, with the placement and autoscaling options)."""

    async def __init__(self, model: str, artifact: str, engine_options: dict[str, Any], hub: Any,
                   report_interval_s: float) -> None:
        from ray import serve

        from llmc.runtime.engine import Engine

        self.model = model
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = await asyncio.to_thread(Engine.load, artifact, **engine_options)
        self.metrics = ServerMetrics(lambda: self.engine.stats())
        self._hub = hub
        self._interval = report_interval_s
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("replica %s of %s loaded %s", self.replica, model, artifact)

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._hub.report.remote(self.model, self.replica, self.metrics.render().decode())
            except Exception as exc:  # the hub restarting: report again next time
                logger.debug("metrics report failed: %s", exc)
            await asyncio.sleep(self._interval)

    async def generate(self, jobs: list[Job], request_id: str, arrival_wall: float,
                       routing: RoutingInfo | None = None) -> AsyncIterator[Admitted | Refused | Failed | list]:
        """Run ``jobs``; yields :class:`Admitted` or :class:`Refused`, then lists of deltas."""
        run = RequestRun(self.engine, jobs, request_id, self.metrics, _arrival(arrival_wall))
        try:
            await run.start()
        except (RequestError, EngineClosedError) as exc:
            yield refused(self.replica, exc)
            return
        try:
            yield Admitted(self.replica)
            async for batch in _coalesced(run.deltas()):
                yield batch
        except Exception as exc:
            logger.exception("request %s failed on replica %s", request_id, self.replica)
            yield Failed(self.replica, f"{type(exc).__name__}: {exc}")
        finally:
            await run.close()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the engine of replica {self.replica} ({self.model}) has stopped")

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
