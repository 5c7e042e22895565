"""The serving engine: continuous batching over any executor, for scripts and asyncio services.

Python API::

    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    engine = Engine.load("out/model", max_running=32, max_num_tokens=512)
    outs = engine.generate(["Once upon a time", [1, 403, 407]], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].timings

    async for chunk in engine.stream("Once upon a time", SamplingParams(max_tokens=32)):
        print(chunk.text, end="")          # chunk.finish_reason is set on the last one

    engine.cancel(request_id)                 # or cancel the task iterating engine.stream()
    engine.stats()                            # running, waiting, kv usage, prefix hits, throughput
    engine.close()                            # also: ``with Engine.load(...) as engine:``

``Engine.load(path, **config)`` takes the :class:`EngineConfig` fields as keywords;
``Engine(executor, tokenizer, EngineConfig(...))`` wraps an executor already loaded. Attributes:
``engine.config`` (the model's :class:`~llmc.compiler.config.ModelConfig`: ``max_position``,
``vocab_size``...), ``engine.engine_config``, ``engine.tokenizer`` (None for models without
one: prompts are then token id lists and outputs have ``text=None``), ``engine.eos_ids``.

Requests: prompts are text or token id lists. A request whose prompt + ``max_tokens`` exceeds
the model's context (or the whole KV cache) raises :class:`~llmc.errors.RequestError` at
submission, with the numbers; a full queue (``max_queue``) raises :class:`QueueFullError`.
Outputs are :class:`~llmc.runtime.outputs.RequestOutput` (``generate``, and the last
``StreamChunk.output``) with ``finish_reason`` ``'stop' | 'length' | 'cancelled'``.

One background thread runs the step loop, one step at a time: schedule
(:mod:`llmc.runtime.scheduler`) -> ``executor.step`` -> batched sampling
(:mod:`llmc.runtime.sampling`) -> incremental detokenization
(:mod:`llmc.runtime.detokenizer`) -> delivery to each request's sink (a future for
:meth:`Engine.generate`, an asyncio queue fed with ``call_soon_threadsafe`` for
:meth:`Engine.stream`, or any callable given to :meth:`Engine.submit`). Callers never block
the loop; prompts are tokenized in the caller's thread (``stream`` uses a worker thread, so
the event loop is not blocked).

**Deterministic mode** (``deterministic=True``) asks the target for batch-invariant kernels
(the torch target computes every token row with fixed-shape operations), so greedy results
do not depend on what else is in the batch, on chunking, prefix-cache hits or preemption.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.kv_cache import KVCacheManager, PagedKVCache, SlotKVCache
from llmc.runtime.loader import kv_blocks, load_model
from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.sampling import RequestSampler, SamplingParams, TokenLogprobs, sample_batch
from llmc.runtime.scheduler import ScheduledSeq, Scheduler, SchedulerOutput, Sequence

Prompt = str | list[int]
Sink = Callable[[StreamChunk | RequestOutput | BaseException], None]


class QueueFullError(RequestError):
    """The engine already holds ``max_queue`` requests."""


@dataclass
class EngineConfig:
    """Engine options (all are keywords of :meth:`Engine.load`).

    ``max_num_tokens`` is the token budget of one step; ``num_blocks`` (or ``kv_memory`` in
    bytes) sizes the KV cache, by default enough for ``max_running`` full-context sequences
    but at most 1 GiB; ``device``, ``threads``, ``block_size`` and ``deterministic`` go to
    the target's loader.
    """

    max_running: int = 32
    max_num_tokens: int = 512
    num_blocks: int | None = None
    kv_memory: int | None = None
    block_size: int | None = None
    prefix_caching: bool = True
    deterministic: bool = False
    device: str | None = None
    threads: int | None = None
    max_queue: int = 4096
    verify: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise LlmcError(f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**kwargs)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    seq: Sequence
    sampler: RequestSampler
    detok: IncrementalDetokenizer | None
    sink: Sink
    streaming: bool
    t_arrival: float
    t_scheduled: float = 0.0
    t_first: float = 0.0
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    num_cached: int = -1


class Engine:
    """Continuous batching over one executor. Thread-safe; see the module docstring."""

    def __init__(self, executor: Executor, tokenizer: LlmcTokenizer | None = None,
                 config: EngineConfig | None = None, eos_ids: set[int] | None = None) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.engine_config = config or EngineConfig()
        self.config = executor.config  # the model's ModelConfig
        self.eos_ids = set(eos_ids if eos_ids is not None else executor.config.eos_token_ids)
        if tokenizer is not None and eos_ids is None:
            self.eos_ids |= set(tokenizer.meta.eos_token_ids)
        self.kv = self._make_cache()
        self.scheduler = Scheduler(self.kv, self._max_running, self.engine_config.max_num_tokens)
        self._cond = threading.Condition()
        self._inbox: list[_Request] = []
        self._cancels: set[str] = set()
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[int, _Request] = {}
        self._req_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._closed = False
        self._counters = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="llmc-engine", daemon=True)
        self._thread.start()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, **config: Any) -> Engine:
        """Load the artifact at ``path``; ``config`` holds :class:`EngineConfig` fields."""
        cfg = EngineConfig.from_kwargs(**config)
        model = load_model(path, verify=cfg.verify, device=cfg.device, threads=cfg.threads,
                           block_size=cfg.block_size, deterministic=cfg.deterministic)
        return cls(model.executor, model.tokenizer, cfg)

    def _make_cache(self) -> KVCacheManager:
        spec, cfg = self.executor.kv_spec(), self.engine_config
        blocks = kv_blocks(spec, cfg.max_running, num_blocks=cfg.num_blocks, kv_memory=cfg.kv_memory)
        self.executor.init_cache(blocks)
        if spec.layout == "slots":
            self._max_running = blocks
            return SlotKVCache(blocks, min(spec.block_size, self.config.max_position))  # block_size: slot capacity
        self._max_running = cfg.max_running
        prefix_caching = cfg.prefix_caching and spec.uses_block_tables
        return PagedKVCache(blocks, spec.block_size, prefix_caching=prefix_caching)

    def close(self) -> None:
        """Stop the step loop (pending requests are cancelled)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer; id lists pass through)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; give prompts as token id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def submit(self, prompt: Prompt, params: SamplingParams | None, sink: Sink, request_id: str | None = None,
               streaming: bool = False, prompt_ids: list[int] | None = None) -> str:
        """Queue a request; ``sink`` receives StreamChunks (if ``streaming``), then the
        RequestOutput, or an exception, from the engine thread. Returns the request id."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode(prompt)
        self._validate(ids, params)
        rid = request_id or f"req-{next(self._req_ids)}"
        seq_id = next(self._seq_ids)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)
        elif params.stop:
            raise RequestError("stop strings need a tokenizer; this model has none")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        req = _Request(rid, prompt if isinstance(prompt, str) else None,
                       Sequence(seq_id, list(ids), len(ids), seq_id), RequestSampler(params, ids, stops), detok,
                       sink, streaming, time.perf_counter(), logprobs=[] if params.logprobs is not None else None)
        with self._cond:
            if self._closed:
                raise LlmcError("the engine is closed")
            if len(self._requests) + len(self._inbox) >= self.engine_config.max_queue:
                raise QueueFullError(f"the engine already holds {self.engine_config.max_queue} requests (max_queue)")
            if rid in self._requests or any(r.request_id == rid for r in self._inbox):
                raise RequestError(f"request id {rid!r} is already in use")
            self._inbox.append(req)
            self._cond.notify_all()
        return rid

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        ctx, vocab = self.config.max_position, self.config.vocab_size
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) + params.max_tokens > ctx:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                               f"of {ctx} tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary of {vocab}")
        if not self.kv.can_ever_hold(len(ids) + params.max_tokens):
            raise RequestError(f"prompt + max_tokens ({len(ids) + params.max_tokens} tokens) needs more than the "
                               f"whole kv cache ({self.kv.num_blocks} blocks of {self.kv.block_size})")

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (its blocks are freed); False if unknown or done."""
        with self._cond:
            if request_id not in self._requests and all(r.request_id != request_id for r in self._inbox):
                return False
            self._cancels.add(request_id)
            self._cond.notify_all()
        return True

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts (text or token id lists) concurrently; blocks until all are done."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and self.tokenizer is None:
            raise RequestError("this model has no tokenizer; give prompts as token id lists")
        encoded = iter(self.tokenizer.encode_batch(texts) if texts and self.tokenizer else [])
        all_ids = [next(encoded) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        futures: list[concurrent.futures.Future] = []
        rids: list[str] = []
        try:
            for prompt, ids, p in zip(prompts, all_ids, plist, strict=True):
                fut: concurrent.futures.Future = concurrent.futures.Future()
                rids.append(self.submit(prompt, p, _future_sink(fut), prompt_ids=ids))
                futures.append(fut)
            return [f.result() for f in futures]
        except BaseException:
            for rid in rids:
                self.cancel(rid)
            raise

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Yield chunks of new text and token ids as they are generated. Leaving the loop
        early, or cancelling the task that iterates, cancels the request."""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, self.encode, prompt) if isinstance(prompt, str) else self.encode(prompt)
        queue: asyncio.Queue = asyncio.Queue()
        rid = request_id or f"req-{next(self._req_ids)}"

        def sink(item: StreamChunk | RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancel(rid)

        self.submit(prompt, params, sink, request_id=rid, streaming=True, prompt_ids=ids)
        done = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if isinstance(item, StreamChunk):
                    done = item.finish_reason is not None
                    yield item
                    if done:
                        return
        finally:
            if not done:
                self.cancel(rid)

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot: queue sizes, KV usage, prefix-cache hits, token counters, throughput."""
        with self._cond:
            now = time.perf_counter()
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            window = sum(n for _, n in self._recent)
            span = (now - self._recent[0][0]) if len(self._recent) > 1 else 0.0
            out: dict[str, Any] = {
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
        return out

    # -- the step loop --------------------------------------------------------------------
    def _loop(self) -> None:
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

    def _finish(self, req: _Request, reason: str, stop_reason: str | int | None,
                error: BaseException | None = None) -> None:
        self.scheduler.finish(req.seq)
        self.executor.release(req.seq.seq_id)
        self._requests.pop(req.request_id, None)
        self._by_seq.pop(req.seq.seq_id, None)
        self._counters["cancelled" if reason == "cancelled" else "finished"] += 1
        if error is not None:
            req.sink(error)
            return
        output = self._output(req, reason, stop_reason)
        if req.streaming:
            req.sink(StreamChunk(req.request_id, "", [], None, reason, output))
        else:
            req.sink(output)

    def _output(self, req: _Request, reason: str, stop_reason: str | int | None) -> RequestOutput:
        end = time.perf_counter()
        seq = req.seq
        n_out, n_prompt = len(seq.output_ids), seq.num_prompt_tokens
        first = req.t_first or end
        scheduled = req.t_scheduled or first
        prefill, decode = first - scheduled, end - first
        timings = {
            "queue_s": scheduled - req.t_arrival,
            "ttft_s": first - req.t_arrival,
            "prefill_s": prefill,
            "decode_s": decode,
            "total_s": end - req.t_arrival,
            "prefill_tok_s": n_prompt / max(prefill, 1e-9),
            "decode_tok_s": max(n_out - 1, 1) / max(decode, 1e-9),
            "tpot_s": decode / (n_out - 1) if n_out > 1 else 0.0,
        }
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt,
            text="".join(req.text) if req.detok is not None else None,
            token_ids=list(seq.output_ids), prompt_token_ids=list(seq.token_ids[:n_prompt]),
            finish_reason=reason, stop_reason=stop_reason, logprobs=req.logprobs, timings=timings,
            num_cached_tokens=max(req.num_cached, 0), num_preemptions=seq.num_preemptions,
        )


def _future_sink(fut: concurrent.futures.Future) -> Sink:
    def sink(item: StreamChunk | RequestOutput | BaseException) -> None:
        if fut.done():
            return
        if isinstance(item, BaseException):
            fut.set_exception(item)
        elif isinstance(item, RequestOutput):
            fut.set_result(item)

    return sink
