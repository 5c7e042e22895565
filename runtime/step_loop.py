"""The engine's background thread: schedule (:mod:`llmc.runtime.scheduler`) -> build the batch
and each sampled row's :class:`~llmc.runtime.sampling.SampleRow` -> ``executor.launch`` (the
step and its sampling, :mod:`llmc.runtime.executor`) -> incremental detokenization
(:mod:`llmc.runtime.detokenizer`) -> delivery to each request's sink. A streamed request's
items wait in :attr:`StepLoop.delivery` (:class:`~llmc.runtime.bridge.StreamDelivery`), which the
loop flushes once a step, just before the next forward pass (with overlap: as soon as the earlier
step's tokens are collected; and whenever it goes idle): one wake-up of each event loop a step for
all its streams.

**Overlap.** When ``launch`` returns a step that is not ready yet (a GPU executor), the loop
does not wait for it: it schedules and launches the next step first, with the tokens still
being sampled deferred (the executor feeds them from its own side), and only then waits for
the earlier step's tokens (the one host-device sync of a step) and delivers them, while the
device runs the later step. Stop conditions are therefore seen one step late: a request that
stopped may have one more token computed, which is dropped, and its blocks are freed as soon
as its stop is seen (steps run in order, so the step in flight finishes with them first). An
executor whose ``launch`` returns ready steps (the default) runs exactly as before: launch,
deliver, schedule the next.

Two extras ride on the same step, which then runs on the host's side (``executor.step``: the
logits come back and are sampled here; the step in flight is collected first, so none of its
tokens is deferred). Requests that want prompt logprobs get the logits of their prompt rows
returned by the same forward pass (``logits_rows`` lists them beside the sampled rows; chunked
prefill scores each chunk as it runs). Constrained requests
(:mod:`llmc.runtime.structured`) need a token mask per sampled row: :class:`MaskWorker` computes
the step's masks on a worker thread while the step runs (both release the GIL), and the
sampler applies them (``sample_batch(..., mask=mask)``) to those rows only.

Callers hand requests over with :meth:`StepLoop.add` and :meth:`StepLoop.cancel` (under one
condition variable; they never wait for a step). The loop holds no reference to the
:class:`~llmc.runtime.engine.Engine`, so an engine nobody holds any more can be collected and
its finalizer can stop the loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.compiler.errors import RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.bridge import StreamDelivery
from llmc.runtime.errors import EngineClosedError, QueueFullError
from llmc.runtime.executor import Executor, PendingStep, StepBatch, StepOutput
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.outputs import StreamChunk
from llmc.runtime.requests import RequestState
from llmc.runtime.sampling import log_softmax, sample_batch, top_logprobs
from llmc.runtime.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from llmc.runtime.structured import ConstraintMatcher, TokenMask, compute_masks

THROUGHPUT_WINDOW_S = 10.0
"""``generation_tok_s`` in :meth:`StepLoop.stats` counts the tokens of this many recent seconds."""


class InFlight:
    """A launched step: what it computes, which sequences it samples, and its pending result."""

    def __init__(self, out: SchedulerOutput, sampled: list[ScheduledSeq], pending: PendingStep, kind: str) -> None:
        self.out = out
        self.sampled = sampled
        self.pending = pending
        self.kind = kind  # "decode" or "other" (see StepLoop.stats)
        self.row_of = {s.seq.seq_id: i for i, s in enumerate(sampled)}


@dataclass
class StepRows:
    """Which rows of a step's logits go where: ``sampled[i]`` samples from row ``sample_rows[i]``;
    ``prompt[j] = (request, first position, first row, count)`` scores prompt positions."""

    sampled: list[ScheduledSeq] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    prompt: list[tuple[RequestState, int, int, int]] = field(default_factory=list)


class MaskWorker:
    """Computes the token masks of a step's constrained rows on a worker thread.

    The hook between the step loop and constrained decoding: :meth:`submit` before the forward
    pass (the masks depend only on tokens sampled before this step), ``.result()`` after it."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, rows: list[tuple[int, ConstraintMatcher]]) -> concurrent.futures.Future[TokenMask] | None:
        """Start the masks of ``(sample row index, matcher)`` pairs; None when there are none."""
        if not rows:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmc-masks")
        return self._pool.submit(compute_masks, rows, self.vocab_size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


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
        self._executor_s = {"decode": 0.0, "other": 0.0}  # the loop thread's time in the executor, by step kind
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._t_start = time.perf_counter()
        self._inflight: InFlight | None = None
        self._masks = MaskWorker(executor.config.vocab_size)
        self.delivery = StreamDelivery()
        """Where streamed requests' items wait for the loop to hand them over, once a step."""
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
        """A snapshot: queue sizes, KV usage, prefix-cache hits, token counters, throughput, and the
        steps run and the loop's seconds in the executor (the forward pass and sampling: launching a
        step and waiting for its tokens) for ``decode`` steps (:attr:`StepBatch.is_decode`: every
        sequence feeds one token and samples) and ``other`` ones (a prompt chunk in the batch); their
        ratio is the mean step time, which the loop's own work (scheduling, delivering tokens) and, in a
        server, the event loop add to."""
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
                "decode_steps": self._counters["decode_steps"],
                "decode_executor_s": self._executor_s["decode"],
                "other_steps": self._counters["other_steps"],
                "other_executor_s": self._executor_s["other"],
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
                while not (self._closed or self._inbox or self._cancels or self.scheduler.has_work()
                           or self._inflight is not None):
                    self.delivery.flush()  # going idle: what the last step delivered goes out now
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
                self._drain()
                self._masks.close()
                self.delivery.flush()
                return
            if self.scheduler.has_work() or self._inflight is not None:
                try:
                    self._step()
                except Exception as exc:  # an engine bug must fail the requests, not hang them
                    self._drain()
                    with self._cond:
                        for req in list(self._requests.values()):
                            self._finish(req, "cancelled", None, error=exc)

    def _drain(self) -> None:
        """Wait for the step in flight, if any, dropping its results (closing, or after an error)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            with contextlib.suppress(Exception):  # its requests are being failed or cancelled anyway
                inflight.pending.result()
            with self._cond:
                for s in inflight.sampled:
                    s.seq.num_pending = 0

    def _step(self) -> None:
        if self._inflight is not None and any(r.on_host for r in self._requests.values()):
            self._collect(self._inflight)  # a step sampled on the host needs every earlier token known
        with self._cond:
            out = self.scheduler.schedule()
        if not out.scheduled:
            if self._inflight is not None:  # everything left waits for the step in flight
                self._collect(self._inflight)
            else:
                self.delivery.flush()
                time.sleep(0.001)  # nothing fits now (cannot happen for validated requests)
            return
        batch, rows = self._build_batch(out)
        now = time.perf_counter()
        for s in out.scheduled:
            req = self._by_seq[s.seq.seq_id]
            if req.num_cached < 0:
                req.num_cached, req.t_scheduled = s.start, now
        previous = self._inflight
        host = bool(rows.prompt) or any(self._by_seq[s.seq.seq_id].on_host for s in rows.sampled)
        masks = None
        if host:  # logits back to the host: prompt scoring, token masks
            constrained = []
            for i, s in enumerate(rows.sampled):
                matcher = self._by_seq[s.seq.seq_id].constraint
                if matcher is not None:
                    constrained.append((i, matcher))
            masks = self._masks.submit(constrained)  # computed while the forward pass runs
        # the earlier steps' tokens go to the event loops now, which handle them while the forward
        # pass runs without the GIL (delivered at the end of the step, their wake-up would contend
        # for the GIL with this thread's scheduling and batch building)
        self.delivery.flush()
        kind = "decode" if batch.is_decode else "other"
        try:
            if host:
                assert not batch.has_deferred, "host-side steps are scheduled with no step in flight"
                with self._in_executor(kind):
                    logits = self.executor.step(batch)
                mask = masks.result() if masks is not None else None
            else:
                with self._cond:
                    sample_rows = [self._by_seq[s.seq.seq_id].sampler.row() for s in rows.sampled]
                with self._in_executor(kind):
                    pending = self.executor.launch(batch, sample_rows)
        except Exception as exc:  # the step failed: fail its requests, keep serving the others
            if previous is not None:
                self._collect(previous)
            with self._cond:
                for s in out.scheduled:
                    req = self._by_seq.get(s.seq.seq_id)
                    if req is not None:
                        self._finish(req, "cancelled", None, error=exc)
            return
        with self._cond:
            self.scheduler.step_done(out)
            for s in rows.sampled if not host else ():
                s.seq.num_pending += 1
            self._counters["steps"] += 1
            self._counters[f"{kind}_steps"] += 1
            self._counters["computed_tokens"] += out.num_tokens
        if host:
            with self._cond:
                for req, position, row, count in rows.prompt:
                    self._score_prompt(req, logits[row : row + count], position)
                if rows.sampled:
                    self._sample(logits[rows.sample_rows], rows.sampled, mask)
            return
        self._inflight = InFlight(out, rows.sampled, pending, kind)
        if previous is not None:
            self._collect(previous)  # the device runs the step just launched meanwhile
            self.delivery.flush()  # its tokens go out now, not a step later
        if self._inflight is not None and self._inflight.pending.ready():
            self._collect(self._inflight)

    @contextlib.contextmanager
    def _in_executor(self, kind: str) -> Iterator[None]:
        """Adds the block's time to the loop's seconds in the executor for ``kind`` steps (when it
        raises, nothing: a failed step is not counted)."""
        t0 = time.perf_counter()
        yield
        self._executor_s[kind] += time.perf_counter() - t0

    def _build_batch(self, out: SchedulerOutput) -> tuple[StepBatch, StepRows]:
        tokens: list[int] = []
        seq_ids, qlens, clens, tables, logits_rows = [], [], [], [], []
        deferred_rows: list[int] = []
        deferred_from: list[int] = []
        rows = StepRows()
        for s in out.scheduled:
            seq = s.seq
            first = len(tokens)
            known = seq.token_ids[s.start : s.start + s.num_new]
            tokens.extend(known)
            if len(known) < s.num_new:  # the last token is still being sampled by the step in flight
                assert self._inflight is not None and len(known) == s.num_new - 1
                deferred_rows.append(len(tokens))
                deferred_from.append(self._inflight.row_of[seq.seq_id])
                tokens.append(-1)
            seq_ids.append(seq.seq_id)
            qlens.append(s.num_new)
            clens.append(s.start + s.num_new)
            tables.append(self.kv.table(seq.seq_id))
            req = self._by_seq[seq.seq_id]
            if req.prompt_rows_pending:
                # positions [lo, hi) predict prompt tokens lo+1 .. hi: their logits come back too
                lo = max(req.next_prompt_row(), s.start)
                hi = min(s.start + s.num_new, seq.num_prompt_tokens - 1)
                if hi > lo:
                    rows.prompt.append((req, lo, len(logits_rows), hi - lo))
                    logits_rows.extend(range(first + lo - s.start, first + hi - s.start))
            if s.sample:
                rows.sampled.append(s)
                rows.sample_rows.append(len(logits_rows))
                logits_rows.append(len(tokens) - 1)
        layout = BatchLayout(tuple(seq_ids), tuple(qlens), tuple(clens))
        batch = StepBatch(np.asarray(tokens), layout, tables, np.asarray(logits_rows, dtype=np.int64),
                          np.asarray(deferred_rows, dtype=np.int64), np.asarray(deferred_from, dtype=np.int64))
        return batch, rows

    def _collect(self, inflight: InFlight) -> None:
        """Wait for a launched step's tokens and deliver them (the step's requests fail if it failed)."""
        if self._inflight is inflight:
            self._inflight = None
        try:
            with self._in_executor(inflight.kind):
                result = inflight.pending.result()
        except Exception as exc:
            with self._cond:
                for s in inflight.sampled:
                    s.seq.num_pending = 0
                for s in inflight.out.scheduled:
                    req = self._by_seq.get(s.seq.seq_id)
                    if req is not None:
                        self._finish(req, "cancelled", None, error=exc)
            return
        with self._cond:
            self._deliver(result, inflight.sampled)

    def _deliver(self, result: StepOutput, sampled: list[ScheduledSeq]) -> None:
        """The tokens a launched step sampled, to the requests still there."""
        reqs: list[RequestState] = []
        tokens: list[int] = []
        lps = []
        for s, token, lp in zip(sampled, result.token_ids.tolist(), result.logprobs, strict=True):
            s.seq.num_pending -= 1
            req = self._by_seq.get(s.seq.seq_id)
            if req is not None and req.seq is s.seq:  # else it finished (or was cancelled) meanwhile
                reqs.append(req)
                tokens.append(int(token))
                lps.append(lp)
        self._append(reqs, tokens, lps)
    def _score_prompt(self, req: RequestState, logits: np.ndarray, position: int) -> None:
        """Logprobs of prompt tokens ``position + 1 ...`` from the logits of the rows before them."""
        assert req.prompt_logprobs is not None and len(req.prompt_logprobs) == position + 1
        seq = req.seq
        targets = np.asarray(seq.token_ids[position + 1 : position + 1 + len(logits)])
        n = req.sampler.params.prompt_logprobs
        req.prompt_logprobs.extend(top_logprobs(log_softmax(logits), targets, [n] * len(targets)))
        seq.cache_limit = req.next_prompt_row() if req.prompt_rows_pending else None

    def _sample(self, logits: np.ndarray, sampled: list[ScheduledSeq], mask: TokenMask | None = None) -> None:
        reqs = [self._by_seq[s.seq.seq_id] for s in sampled]
        done = [r for r in reqs if r.sampler.max_tokens == 0]  # prompt scoring only: nothing to generate
        if done:
            keep = [i for i, r in enumerate(reqs) if r.sampler.max_tokens > 0]
            for req in done:
                self._counters["prompt_tokens"] += req.seq.num_prompt_tokens
                req.t_first = time.perf_counter()
                self._finish(req, "length", None)
            if not keep:
                return
            if mask is not None:
                position = {i: k for k, i in enumerate(keep)}
                picked = [j for j, r in enumerate(mask.rows) if r in position]
                mask = TokenMask([position[mask.rows[j]] for j in picked], mask.bits[picked])
            logits, reqs = logits[keep], [reqs[i] for i in keep]
        tokens, lps = sample_batch(logits, [r.sampler for r in reqs], mask=mask)
        self._append(reqs, tokens.tolist(), lps)

    def _append(self, reqs: list[RequestState], tokens: list[int], lps: list[Any]) -> None:
        """Each request's new token: stops, constraint, detokenization, delivery."""
        now = time.perf_counter()
        if reqs:
            self._recent.append((now, len(reqs)))
        self._counters["generation_tokens"] += len(reqs)
        for req, token, lp in zip(reqs, tokens, lps, strict=True):
            first = not req.t_first
            if first:
                req.t_first = now
                self._counters["prompt_tokens"] += req.seq.num_prompt_tokens
            req.seq.token_ids.append(token)
            finish = req.sampler.check_stop(token)
            stop_reason: str | int | None = token if finish == "stop" else None
            if req.constraint is not None:
                if not req.constraint.advance(token):  # an engine bug: fail this request only
                    error = RuntimeError(f"request {req.request_id}: token {token} was sampled but its constraint "
                                         f"does not allow it ({req.constraint.error})")
                    self._finish(req, "cancelled", None, error=error)
                    continue
                if req.constraint.finished and not finish:
                    finish = "stop"  # the constrained output is complete
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
                req.sink(StreamChunk(req.request_id, delta, [token], [lp] if lp is not None else None,
                                     prompt_logprobs=req.prompt_logprobs if first else None))
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
            unsent = req.prompt_logprobs if not req.seq.output_ids else None  # no chunk carried them yet
            req.sink(StreamChunk(req.request_id, "", [], None, reason, output, prompt_logprobs=unsent))
        else:
            req.sink(output)
