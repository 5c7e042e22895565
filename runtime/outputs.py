"""What the engine hands back: final :class:`RequestOutput` objects and streamed :class:`StreamChunk` s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmc.runtime.sampling import TokenLogprobs

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class RequestOutput:
    """A finished request.

    ``finish_reason`` is ``'stop'`` (EOS, a stop token id or a stop string), ``'length'``
    (``max_tokens``) or ``'cancelled'``. ``stop_reason`` names the stop string or token id.
    ``text`` is None when the model has no tokenizer. ``token_ids`` include a final EOS or
    stop token. ``timings`` (seconds) has ``queue_s``, ``ttft_s``, ``prefill_s``,
    ``decode_s``, ``total_s``, ``prefill_tok_s``, ``decode_tok_s`` and ``tpot_s``.
    ``prompt_logprobs`` (with ``SamplingParams(prompt_logprobs=N)``) has one entry per prompt
    token: None for the first, then the token's logprob under the model given the tokens before
    it and the N most likely alternatives.
    """

    request_id: str
    prompt: str | None
    text: str | None
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``llmc run --json`` keys plus the rest)."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids,
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "timings": self.timings,
        }
        if self.logprobs is not None:
            out["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                for lp in self.logprobs
            ]
        if self.prompt_logprobs is not None:
            out["prompt_logprobs"] = [
                None if lp is None else {"token_id": lp.token_id, "logprob": lp.logprob,
                                         "top": [list(t) for t in lp.top]}
                for lp in self.prompt_logprobs
            ]
        return out


@dataclass
class StreamChunk:
    """New output of a streamed request: ``text`` and ``token_ids`` are deltas.

    The last chunk has ``finish_reason`` set and carries the whole ``output``. With
    ``SamplingParams(prompt_logprobs=N)`` the first chunk carries ``prompt_logprobs``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    output: RequestOutput | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
