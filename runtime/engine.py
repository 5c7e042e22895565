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
    engine.is_alive()                         # whether it still takes requests
    engine.close()                            # also: ``with Engine.load(...) as engine:``

``Engine.load(path, **config)`` takes the :class:`EngineConfig` fields as keywords;
``Engine(executor, tokenizer, EngineConfig(...))`` wraps an executor already loaded. Attributes:
``engine.config`` (the model's :class:`~llmc.compiler.config.ModelConfig`: ``max_position``,
``vocab_size``...), ``engine.engine_config``, ``engine.tokenizer`` (None for models without
one: prompts are then token id lists and outputs have ``text=None``), ``engine.eos_ids``.

Requests: prompts are text or token id lists; ``SamplingParams(max_tokens=None)`` generates up
to the end of the context. ``SamplingParams(prompt_logprobs=N)`` scores the prompt in its prefill
(``RequestOutput.prompt_logprobs``; ``max_tokens=0`` scores without generating), and
``SamplingParams(constraint=Constraint.json_schema(...))`` (or ``json_object()``, ``regex(...)``,
``grammar(...)``, :mod:`llmc.runtime.structured`) constrains the output. A request the engine cannot run raises a typed
:class:`~llmc.errors.RequestError` at submission that carries the numbers
(:mod:`llmc.runtime.errors`): :class:`~llmc.runtime.errors.ContextLengthError`,
:class:`~llmc.runtime.errors.TokenIdError`, :class:`~llmc.runtime.errors.EmptyPromptError`,
:class:`~llmc.runtime.errors.KVCacheTooSmallError`, :class:`~llmc.runtime.errors.QueueFullError`
(``max_queue``); a closed engine raises :class:`~llmc.runtime.errors.EngineClosedError`.
Outputs are :class:`~llmc.runtime.outputs.RequestOutput` (``generate``, and the last
``StreamChunk.output``) with ``finish_reason`` ``'stop' | 'length' | 'cancelled'``.

One background thread (:mod:`llmc.runtime.step_loop`) runs the steps and delivers results to
each request's sink (:mod:`llmc.runtime.bridge`: a future for :meth:`Engine.generate`, an
asyncio queue for :meth:`Engine.stream` and :meth:`Engine.open_stream`, or any callable given
to :meth:`Engine.submit`). Callers never block the loop; prompts are tokenized in the caller's
thread (``stream`` uses a worker thread, so the event loop is not blocked). An engine that is
never closed is closed when it is garbage collected or when the interpreter exits, so a script
that forgets ``with`` (or is interrupted by Ctrl-C) still exits cleanly.

**Deterministic mode** (``deterministic=True``) asks the target for batch-invariant kernels
(the torch target computes every token row with fixed-shape operations), so greedy results
do not depend on what else is in the batch, on chunking, prefix-cache hits or preemption.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import weakref
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, fields
from typing import Any

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.bridge import RequestStream, future_sink
from llmc.runtime.errors import QueueFullError
from llmc.runtime.executor import Executor
from llmc.runtime.loader import kv_cache_for, load_model
from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.requests import RequestState, Sink, check_request
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.step_loop import StepLoop
from llmc.runtime.structured import Constraint, GrammarCompiler

__all__ = ["Engine", "EngineConfig", "Prompt", "QueueFullError", "Sink"]

Prompt = str | list[int]


@dataclass
class EngineConfig:
    """Engine options (all are keywords of :meth:`Engine.load`).

    ``max_num_tokens`` is the token budget of one step. The KV cache holds ``num_blocks`` blocks,
    or ``kv_memory`` bytes, or (``gpu_memory_utilization``, a GPU executor) what is left of that
    fraction of the device's memory after the weights and a step's activations; by default enough
    for ``max_running`` sequences of ``max_model_len`` tokens but at most 1 GiB. ``max_model_len``
    (default: the model's context) is the longest prompt + output a request may have; longer ones
    are refused (:class:`~llmc.runtime.errors.ContextLengthError`). When the running sequences
    outgrow the cache the newest are preempted and recomputed later, never failed. ``device``,
    ``threads``, ``block_size`` and ``deterministic`` go to the target's loader.
    """

    max_running: int = 32
    max_num_tokens: int = 512
    num_blocks: int | None = None
    kv_memory: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
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


class Engine:
    """Continuous batching over one executor. Thread-safe; see the module docstring."""

    def __init__(self, executor: Executor, tokenizer: LlmcTokenizer | None = None,
                 config: EngineConfig | None = None, eos_ids: set[int] | None = None) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.engine_config = cfg = config or EngineConfig()
        self.config = executor.config  # the model's ModelConfig
        self.eos_ids = set(eos_ids if eos_ids is not None else executor.config.eos_token_ids)
        if tokenizer is not None and eos_ids is None:
            self.eos_ids |= set(tokenizer.meta.eos_token_ids)
        self.max_model_len = self._max_model_len(cfg.max_model_len, executor.config.max_position)
        self.kv = kv_cache_for(executor, cfg.max_running, num_blocks=cfg.num_blocks, kv_memory=cfg.kv_memory,
                               prefix_caching=cfg.prefix_caching, gpu_memory_utilization=cfg.gpu_memory_utilization,
                               max_model_len=cfg.max_model_len, max_num_tokens=cfg.max_num_tokens)
        max_running = min(cfg.max_running, self.kv.max_sequences or cfg.max_running)
        self.scheduler = Scheduler(self.kv, max_running, cfg.max_num_tokens)
        self._req_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._grammar: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._loop = StepLoop(executor, self.kv, self.scheduler, cfg.max_queue)
        self._loop.start()
        # close on garbage collection or at interpreter exit, before the loop thread could be
        # stopped inside a step (a daemon thread killed in C++ code aborts the process)
        self._finalizer = weakref.finalize(self, self._loop.close)

    @staticmethod
    def _max_model_len(value: int | None, context: int) -> int:
        if value is None:
            return context
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= context:
            raise LlmcError(f"max_model_len must be an integer from 1 to the model's context ({context}), "
                            f"got {value!r}")
        return value

    @classmethod
    def load(cls, path: str, **config: Any) -> Engine:
        """Load the artifact at ``path``; ``config`` holds :class:`EngineConfig` fields."""
        cfg = EngineConfig.from_kwargs(**config)
        model = load_model(path, verify=cfg.verify, device=cfg.device, threads=cfg.threads,
                           block_size=cfg.block_size, deterministic=cfg.deterministic)
        return cls(model.executor, model.tokenizer, cfg)

    def close(self) -> None:
        """Stop the step loop (pending requests are cancelled)."""
        self._finalizer()

    def is_alive(self) -> bool:
        """Whether the engine takes requests (not closed, and its step loop runs)."""
        return self._loop.is_alive()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer; id lists pass through)."""
        if isinstance(prompt, str):
            return self._text_tokenizer().encode(prompt)
        return [int(t) for t in prompt]

    def _text_tokenizer(self) -> LlmcTokenizer:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer; give prompts as token id lists")
        return self.tokenizer

    def grammar(self) -> GrammarCompiler:
        """The constrained-decoding compiler for this model's tokenizer (made on first use)."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarCompiler(self._text_tokenizer(), self.config.vocab_size, self.eos_ids)
            return self._grammar

    def check_constraint(self, constraint: Constraint) -> None:
        """Compile ``constraint`` now (it is kept for the requests that use it); raises
        :class:`~llmc.runtime.structured.GrammarError`. Servers call it off the event loop."""
        self.grammar().check(constraint)

    def submit(self, prompt: Prompt | None, params: SamplingParams | None, sink: Sink, request_id: str | None = None,
               streaming: bool = False, prompt_ids: list[int] | None = None) -> str:
        """Queue a request; ``sink`` receives StreamChunks (if ``streaming``), then the
        RequestOutput, or an exception, from the engine thread. Returns the request id.

        ``prompt_ids`` are the prompt's token ids when the caller has them (``prompt`` may then
        be None). Raises the typed errors of :mod:`llmc.runtime.errors` when the request cannot run."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode(prompt)  # type: ignore[arg-type]
        max_tokens = check_request(ids, params, self.max_model_len, self.config.vocab_size, self.kv)
        matcher = self.grammar().matcher(params.constraint) if params.constraint is not None else None
        rid = request_id or self._new_request_id()
        req = RequestState.create(rid, next(self._seq_ids), prompt if isinstance(prompt, str) else None, ids,
                                  params, max_tokens, sink, streaming, self.tokenizer, self.eos_ids, matcher)
        self._loop.add(req)
        return rid

    def open_stream(self, prompt: Prompt | None, params: SamplingParams | None = None, request_id: str | None = None,
                    prompt_ids: list[int] | None = None) -> RequestStream:
        """Submit a streamed request now (raising its errors here) and return its chunks as an
        async iterator in the running event loop; ``cancel()``/``aclose()`` on it cancels the request."""
        stream = RequestStream(request_id or self._new_request_id(), self._loop.cancel, self._loop.delivery)
        self.submit(prompt, params, stream.sink, request_id=stream.request_id, streaming=True, prompt_ids=prompt_ids)
        return stream

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (its blocks are freed); False if unknown or done."""
        return self._loop.cancel(request_id)

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
        encoded = iter(self._text_tokenizer().encode_batch(texts) if texts else [])
        all_ids = [next(encoded) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        futures: list[concurrent.futures.Future[RequestOutput]] = []
        rids: list[str] = []
        try:
            for prompt, ids, p in zip(prompts, all_ids, plist, strict=True):
                fut: concurrent.futures.Future[RequestOutput] = concurrent.futures.Future()
                rids.append(self.submit(prompt, p, future_sink(fut), prompt_ids=ids))
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
        chunks = self.open_stream(prompt, params, request_id=request_id, prompt_ids=ids)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            chunks.cancel()

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot: queue sizes, KV usage, prefix-cache hits, token counters, throughput."""
        return self._loop.stats()

    def _new_request_id(self) -> str:
        return f"req-{next(self._req_ids)}"
