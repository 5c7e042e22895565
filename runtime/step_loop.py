"""The engine's background thread: one step at a time, schedule
(:mod:`llmc.runtime.scheduler`) -> ``executor.step`` -> batched sampling
(:mod:`llmc.runtime.sampling`) -> incremental detokenization
(:mod:`llmc.runtime.detokenizer`) -> delivery to each request's sink.

Callers hand requests over with :meth:`StepLoop.add` and :meth:`StepLoop.cancel` (under one
condition variable; they never wait for a step). The loop holds no reference to the
:class:`~llmc.runtime.engine.Engine`, so an engine nobody holds any more can be collected and
its finalizer can stop the loop.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

from llmc.compiler.errors import RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.errors import EngineClosedError, QueueFullError
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.outputs import StreamChunk
from llmc.runtime.requests import RequestState
from llmc.runtime.sampling import sample_batch
from llmc.runtime.scheduler import ScheduledSeq, Scheduler, SchedulerOutput

THROUGHPUT_WINDOW_S = 10.0
"""``generation_tok_s`` in :meth:`StepLoop.stats` counts the tokens of this many recent seconds."""


class StepLoop:
    """Runs the steps of one executor on a daemon thread (started by :meth:`start`)."""

    def __init__(self, executor: Executor, kv: KVCacheManager, scheduler: Scheduler, max_queue: int) -> None:
        self.executor = executor
        self.kv = kv
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: list[RequestState] = []
        self._cancels: set[str] = set()
        self._requests: dict[str, RequestState] = {}
        self._by_seq: dict[int, RequestState] = {}
        self._closed = False
        self._counters: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="llmc-engine", daemon=True)

    # -- what callers do (any thread) ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, req: RequestState) -> None:
        """Queue a request; raises :class:`EngineClosedError`, :class:`QueueFullError` or a
        :class:`RequestError` for a request id already in use."""
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise EngineClosedError
            if len(self._requests) + len(self._inbox) >= self.max_queue:
                raise QueueFullError(self.max_queue)
            rid = req.request_id
            if rid in self._requests or any(r.request_id == rid for r in self._inbox):
                raise RequestError(f"request id {rid!r} is already in use")
            self._inbox.append(req)
            self._cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (its blocks are freed); False if unknown or done."""
        with self._cond:
            if request_id not in self._requests and all(r.request_id != request_id for r in self._inbox):
                return False
            self._cancels.add(request_id)
            self._cond.notify_all()
        return True

    def is_alive(self) -> bool:
        """Whether the loop takes requests: started, not closed, and its thread still running."""
        return not self._closed and self._thread.is_alive()

    def close(self) -> None:
        """Stop the loop: pending requests are cancelled, the step in flight finishes first. Waits
        for the thread unless called on it (a sink that drops the last reference to the engine)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def stats(self) -> dict[str, Any]:
        """A snapshot: queue sizes, KV usage, prefix-cache hits, token counters, throughput."""
        with self._cond:
            now = time.perf_counter()
            while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            window = sum(n for _, n in self._recent)
            span = (now - self._recent[0][0]) if len(self._recent) > 1 else 0.0
            return {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting) + len(self._inbox),
                **self.kv.stats().to_dict(),
                "num_preemptions": self.scheduler.num_preemptions,
                "steps": self._counters["steps"],
                "prompt_tokens": self._counters["prompt_tokens"],
                "computed_tokens": self._counters["computed_tokens"],
                "generation_tokens": self._counters["generation_tokens"],
                "requests_finished": self._counters["finished"],
                "requests_cancelled": self._counters["cancelled"],
                "generation_tok_s": window / span if span > 0 else 0.0,
                "uptime_s": now - self._t_start,
            }

    # -- the loop thread ------------------------------------------------------------------
    def _run(self) -> None:
        self.executor.bind_step_thread()
        while True:
            with self._cond:
                while not (self._closed or self._inbox or self._cancels or self.scheduler.has_work()):
                    self._cond.wait()
                if self._closed:
                    self._cancels.update(self._requests)
                    self._cancels.update(r.request_id for r in self._inbox)
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
                closed = self._closed
                for req in inbox:
                    self._requests[req.request_id] = req
                    self._by_seq[req.seq.seq_id] = req
                    self.scheduler.add(req.seq)
                for rid in cancels:
                    if rid in self._requests:
                        self._finish(self._requests[rid], "cancelled", None)
            if closed:
                return
            if self.scheduler.has_work():
                try:
                    self._step()
                except Exception as exc:  # an engine bug must fail the requests, not hang them
                    with self._cond:
                        for req in list(self._requests.values()):
                            self._finish(req, "cancelled", None, error=exc)

    def _step(self) -> None:
        with self._cond:
            out = self.scheduler.schedule()
        if not out.scheduled:
            time.sleep(0.001)  # nothing fits now (cannot happen for validated requests)
            return
        batch, sampled = self._build_batch(out)
        now = time.perf_counter()
        for s in out.scheduled:
            req = self._by_seq[s.seq.seq_id]
            if req.num_cached < 0:
                req.num_cached, req.t_scheduled = s.start, now
        try:
            logits = self.executor.step(batch)
        except Exception as exc:  # the step failed: fail its requests, keep serving the others
            with self._cond:
                for s in out.scheduled:
                    req = self._by_seq[s.seq.seq_id]
                    self._finish(req, "cancelled", None, error=exc)
            return
        with self._cond:
            self.scheduler.step_done(out)
            self._counters["steps"] += 1
            self._counters["computed_tokens"] += out.num_tokens
            if sampled:
                self._sample(logits, sampled)

    def _build_batch(self, out: SchedulerOutput) -> tuple[StepBatch, list[ScheduledSeq]]:
        tokens: list[int] = []
        seq_ids, qlens, clens, tables, rows, sampled = [], [], [], [], [], []
        for s in out.scheduled:
            seq = s.seq
            tokens.extend(seq.token_ids[s.start : s.start + s.num_new])
            seq_ids.append(seq.seq_id)
            qlens.append(s.num_new)
            clens.append(s.start + s.num_new)
            tables.append(self.kv.table(seq.seq_id))
            if s.sample:
                rows.append(len(tokens) - 1)
                sampled.append(s)
        layout = BatchLayout(tuple(seq_ids), tuple(qlens), tuple(clens))
        return StepBatch(np.asarray(tokens), layout, tables, np.asarray(rows, dtype=np.int64)), sampled

    def _sample(self, logits: np.ndarray, sampled: list[ScheduledSeq]) -> None:
        reqs = [self._by_seq[s.seq.seq_id] for s in sampled]
        tokens, lps = sample_batch(logits, [r.sampler for r in reqs])
        now = time.perf_counter()
        self._recent.append((now, len(reqs)))
        self._counters["generation_tokens"] += len(reqs)
        for req, token, lp in zip(reqs, tokens.tolist(), lps, strict=True):
            if not req.t_first:
                req.t_first = now
                self._counters["prompt_tokens"] += req.seq.num_prompt_tokens
            req.seq.token_ids.append(token)
            finish = req.sampler.check_stop(token)
            stop_reason: str | int | None = token if finish == "stop" else None
            delta = ""
            if req.detok is not None:
                delta = req.detok.add(token)
                if req.detok.stopped:
                    finish, stop_reason = "stop", req.detok.stop_string
                if finish:
                    delta += req.detok.flush()
            req.text.append(delta)
            if lp is not None and req.logprobs is not None:
                req.logprobs.append(lp)
            if req.streaming:
                req.sink(StreamChunk(req.request_id, delta, [token], [lp] if lp is not None else None))
            if finish:
                self._finish(req, finish, stop_reason)

    def _finish(self, req: RequestState, reason: str, stop_reason: str | int | None,
                error: BaseException | None = None) -> None:
        self.scheduler.finish(req.seq)
        self.executor.release(req.seq.seq_id)
        self._requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)
        self._counters["cancelled" if reason == "cancelled" else "finished"] += 1
        if error is not None:
            req.sink(error)
            return
        output = req.output(reason, stop_reason)
        if req.streaming:
            req.sink(StreamChunk(req.request_id, "", [], None, reason, output))
        else:
            req.sink(output)
