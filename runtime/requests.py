"""One request inside the engine: the checks that admit it (:func:`check_request`), its state
while it runs (:class:`RequestState`) and the :class:`~llmc.runtime.outputs.RequestOutput`
built when it ends (:meth:`RequestState.output`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmc.compiler.errors import RequestError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.errors import ContextLengthError, EmptyPromptError, KVCacheTooSmallError, TokenIdError
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.outputs import RequestOutput, StreamChunk
from llmc.runtime.sampling import RequestSampler, SamplingParams, TokenLogprobs
from llmc.runtime.scheduler import Sequence
from llmc.runtime.structured import ConstraintMatcher

Sink = Callable[[StreamChunk | RequestOutput | BaseException], None]
"""Where the engine thread delivers a request's results: its StreamChunks (when streaming), then
its RequestOutput, or the exception that failed it."""


def check_request(ids: list[int], params: SamplingParams, context_length: int, vocab_size: int,
                  kv: KVCacheManager) -> int:
    """The number of tokens the request may generate; raises the typed
    :class:`~llmc.compiler.errors.RequestError` that says why it cannot run."""
    if not ids:
        raise EmptyPromptError
    TokenIdError.check(ids, vocab_size)
    max_tokens = params.max_new_tokens(len(ids), context_length)
    least = 0 if params.prompt_logprobs is not None else 1  # scoring a prompt needs no new token
    if max_tokens < least or len(ids) + max_tokens > context_length:
        raise ContextLengthError(len(ids), params.max_tokens, context_length)
    if not kv.can_ever_hold(len(ids) + max_tokens):
        raise KVCacheTooSmallError(len(ids) + max_tokens, kv.num_blocks, kv.block_size)
    return max_tokens


@dataclass(eq=False)
class RequestState:
    """A request from submission to its end: tokens, sampler, detokenizer, where results go, timings."""

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
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With ``params.prompt_logprobs``: entry ``p`` scores prompt token ``p`` (None for the first)."""
    constraint: ConstraintMatcher | None = None

    @property
    def prompt_rows_pending(self) -> bool:
        """Whether prompt positions still wait for their logits (``prompt_logprobs`` not complete)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.seq.num_prompt_tokens

    @property
    def on_host(self) -> bool:
        """Whether this request's steps need their logits on the host (the step loop samples them there,
        never overlapped): token masks, prompt logprobs, or prompt scoring alone (``max_tokens`` 0)."""
        return self.constraint is not None or self.prompt_rows_pending or self.sampler.max_tokens == 0

    def next_prompt_row(self) -> int:
        """The first position whose logits are still wanted for the prompt's logprobs (position
        ``p`` predicts prompt token ``p + 1``)."""
        assert self.prompt_logprobs is not None
        return len(self.prompt_logprobs) - 1

    @classmethod
    def create(cls, request_id: str, seq_id: int, prompt: str | None, ids: list[int], params: SamplingParams,
               max_tokens: int, sink: Sink, streaming: bool, tokenizer: LlmcTokenizer | None,
               eos_ids: set[int], constraint: ConstraintMatcher | None = None) -> RequestState:
        """A new request of prompt token ``ids`` (``max_tokens`` from :func:`check_request`;
        ``constraint``: the matcher of ``params.constraint``)."""
        detok = None
        if tokenizer is not None:
            detok = IncrementalDetokenizer(tokenizer, ids, params.stop, params.skip_special_tokens)
        elif params.stop:
            raise RequestError("stop strings need a tokenizer; this model has none")
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        # max_tokens 0 (prompt scoring only): the prompt's last row still runs, in the step that finishes it
        seq = Sequence(seq_id, list(ids), len(ids), seq_id, max_len=len(ids) + max(max_tokens, 1))
        scored: list[TokenLogprobs | None] | None = None
        if params.prompt_logprobs is not None:
            scored = [None]  # the first token has no prediction
            seq.cache_limit = 0  # every prompt row is computed: no prefix-cache hits for them
        return cls(request_id, prompt, seq, RequestSampler(params, ids, stops, max_tokens), detok, sink, streaming,
                   time.perf_counter(), logprobs=[] if params.logprobs is not None else None,
                   prompt_logprobs=scored, constraint=constraint)

    def output(self, reason: str, stop_reason: str | int | None) -> RequestOutput:
        """The finished request (``reason``: ``'stop' | 'length' | 'cancelled'``) with its timings."""
        end = time.perf_counter()
        seq = self.seq
        n_out, n_prompt = len(seq.output_ids), seq.num_prompt_tokens
        first = self.t_first or end
        scheduled = self.t_scheduled or first
        prefill, decode = first - scheduled, end - first
        timings = {
            "queue_s": scheduled - self.t_arrival,
            "ttft_s": first - self.t_arrival,
            "prefill_s": prefill,
            "decode_s": decode,
            "total_s": end - self.t_arrival,
            "prefill_tok_s": n_prompt / max(prefill, 1e-9),
            "decode_tok_s": max(n_out - 1, 1) / max(decode, 1e-9),
            "tpot_s": decode / (n_out - 1) if n_out > 1 else 0.0,
        }
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            text="".join(self.text) if self.detok is not None else None,
            token_ids=list(seq.output_ids), prompt_token_ids=list(seq.token_ids[:n_prompt]),
            finish_reason=reason, stop_reason=stop_reason, logprobs=self.logprobs, timings=timings,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=max(self.num_cached, 0), num_preemptions=seq.num_preemptions,
        )
