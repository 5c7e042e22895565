"""Sampling parameters and the batched token sampler.

:func:`sample_batch` picks the next token of every row of a ``[B, vocab]`` logits array at
once (NumPy over the whole batch): penalties, temperature, top-k, top-p and min-p masks,
then an inverse-CDF draw whose uniform number comes from each request's own generator, so
a seeded request gives the same tokens whatever else is in the batch. Greedy rows take the
argmax. Logprobs are those of the model's raw distribution (before penalties and
temperature), as the OpenAI API reports them.

What one row needs is fixed in a :class:`SampleRow` when its step is launched
(:meth:`RequestSampler.row` draws the request's next uniform there), so a sampler on another
thread or device (an executor's ``launch``, :mod:`llmc.runtime.executor`) computes exactly what
:func:`sample_batch` computes here from the same rows.

A constrained request (``SamplingParams(constraint=...)``, :mod:`llmc.runtime.structured`) gets
its disallowed tokens set to -inf before sampling, through the :class:`~llmc.runtime.structured.TokenMask`
given to :func:`sample_batch` (the step loop computes it beside the forward pass).

Stop strings are applied to text by :mod:`llmc.runtime.detokenizer`; stop token ids, EOS and
``max_tokens`` by :meth:`RequestSampler.check_stop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llmc.compiler.errors import RequestError

if TYPE_CHECKING:
    from llmc.runtime.structured import Constraint, TokenMask


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (field names follow the OpenAI API).

    ``max_tokens=None`` asks for the rest of the context: as many tokens as the model's context
    leaves after the prompt (see :meth:`max_new_tokens`).

    ``logprobs=N`` reports each generated token's logprob and the N most likely alternatives;
    ``prompt_logprobs=N`` the same for the prompt's tokens (the first has none), computed in the
    prefill (``RequestOutput.prompt_logprobs``); with it, ``max_tokens=0`` only scores the prompt.
    ``constraint`` (:class:`~llmc.runtime.structured.Constraint`) limits the output to a JSON
    object, a JSON Schema, a regex or a grammar.
    """

    max_tokens: int | None = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if self.max_tokens is not None and not _is_int(self.max_tokens):  # None: the rest of the context
            raise RequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if not _is_int(self.top_k):
            raise RequestError(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise RequestError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= 20):
                raise RequestError(f"{name} must be an integer between 0 and 20, got {value!r}")
        if self.constraint is not None:
            from llmc.runtime.structured import Constraint

            if not isinstance(self.constraint, Constraint):
                raise RequestError(f"constraint must be an llmc.runtime.structured.Constraint, got "
                                   f"{type(self.constraint).__name__}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.max_tokens is not None and self.max_tokens < 1 and not (
                self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise RequestError(f"max_tokens must be at least 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise RequestError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not all(isinstance(s, str) for s in self.stop):
            raise RequestError("stop must be a string or a list of strings")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")

    def max_new_tokens(self, prompt_tokens: int, context_length: int) -> int:
        """The most tokens to generate after a prompt of ``prompt_tokens``: ``max_tokens``, or for
        None what ``context_length`` leaves (which may be < 1: the engine then refuses the request)."""
        return self.max_tokens if self.max_tokens is not None else context_length - prompt_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and the ``n`` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SampleRow:
    """Everything sampling one logits row needs, fixed when its step is launched.

    ``uniform`` is the request's next draw from its own generator (0.0 for greedy rows, which
    draw none); ``prompt_ids`` (sorted, unique) and ``output_ids`` (the outputs known to the
    host) are filled only when the request has penalties (else empty)."""

    params: SamplingParams
    uniform: float = 0.0
    prompt_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    output_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class RequestSampler:
    """Per-request sampling state: the parameters, a private generator and penalty counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], stop_ids: set[int],
                 max_tokens: int | None = None) -> None:
        """``max_tokens`` overrides ``params.max_tokens`` (the engine resolves None to the rest of the context)."""
        self.params = params
        limit = params.max_tokens if max_tokens is None else max_tokens
        if limit is None:
            raise ValueError("max_tokens=None must be resolved against the context before sampling")
        self.max_tokens: int = limit
        self.rng = np.random.default_rng(params.seed)
        self.prompt_ids = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        self.output_ids: list[int] = []
        self.stop_ids = stop_ids

    def row(self) -> SampleRow:
        """This request's :class:`SampleRow` for its next token (draws the next uniform unless greedy)."""
        p = self.params
        uniform = 0.0 if p.greedy else float(self.rng.random())
        if not p.has_penalties:
            return SampleRow(p, uniform)
        return SampleRow(p, uniform, self.prompt_ids, np.asarray(self.output_ids, dtype=np.int64))

    def check_stop(self, token: int) -> str | None:
        """Record ``token``; returns ``'stop'`` or ``'length'`` when the request is done."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            return "stop"
        if len(self.output_ids) >= self.max_tokens:
            return "length"
        return None


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def row_outputs(row: SampleRow, extra: int = -1) -> np.ndarray:
    """The row's output ids for penalties: those the host knows, plus ``extra`` (an output the
    host has not seen yet, computed on the executor's side; -1: none)."""
    return row.output_ids if extra < 0 else np.append(row.output_ids, np.int64(extra))


def apply_penalties(x: np.ndarray, rows: list[SampleRow] | list[RequestSampler],
                    extra_outputs: np.ndarray | None = None) -> None:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) in place."""
    for r, s in enumerate(rows):
        if isinstance(s, RequestSampler):  # its state now (no uniform is drawn)
            s = SampleRow(s.params, 0.0, s.prompt_ids, np.asarray(s.output_ids, dtype=np.int64))
        p = s.params
        if not p.has_penalties:
            continue
        outputs = row_outputs(s, -1 if extra_outputs is None else int(extra_outputs[r]))
        if p.repetition_penalty != 1.0:
            seen = np.union1d(s.prompt_ids, outputs)
            vals = x[r, seen]
            x[r, seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if outputs.size and (p.presence_penalty or p.frequency_penalty):
            ids, counts = np.unique(outputs, return_counts=True)
            x[r, ids] -= p.frequency_penalty * counts + p.presence_penalty


def filter_probs(x: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                 min_p: np.ndarray) -> np.ndarray:
    """Probabilities ``[B, V]`` (float64) after temperature, top-k, top-p and min-p, per row."""
    x = x.astype(np.float64) / temperature[:, None]
    vocab = x.shape[1]
    if np.any((top_k > 0) & (top_k < vocab)):
        k = np.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = -np.sort(-x, axis=1)[np.arange(len(k)), k - 1]  # ties with the k-th value are kept
        x = np.where(x < kth[:, None], -np.inf, x)
    probs = np.exp(x - x.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    if np.any(top_p < 1.0):
        order = np.argsort(-probs, axis=1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=1)
        keep_sorted = np.cumsum(sorted_p, axis=1) - sorted_p < top_p[:, None]  # the top token always stays
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        probs = np.where(keep, probs, 0.0)
    if np.any(min_p > 0):
        probs = np.where(probs >= (min_p[:, None] * probs.max(axis=1, keepdims=True)), probs, 0.0)
    return probs / probs.sum(axis=1, keepdims=True)


def draw(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw per row: the first token whose cumulative mass exceeds ``u * total``."""
    cdf = np.cumsum(probs, axis=1)
    idx = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(axis=1)
    return np.minimum(idx, probs.shape[1] - 1)


def top_logprobs(logp: np.ndarray, tokens: np.ndarray, n: list[int | None]) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = []
    for r, k in enumerate(n):
        if k is None:
            out.append(None)
            continue
        top: list[tuple[int, float]] = []
        if k > 0:
            ids = np.argpartition(-logp[r], k - 1)[:k]
            ids = ids[np.argsort(-logp[r, ids], kind="stable")]
            top = [(int(i), float(logp[r, i])) for i in ids]
        out.append(TokenLogprobs(int(tokens[r]), float(logp[r, tokens[r]]), top))
    return out


def sample_batch(logits: np.ndarray, rows: list[SampleRow] | list[RequestSampler], mask: TokenMask | None = None,
                 extra_outputs: np.ndarray | None = None) -> tuple[np.ndarray, list[TokenLogprobs | None]]:
    """Next token of every row of ``logits [B, V]``; returns (token ids [B], logprobs per row).

    ``rows`` are :class:`SampleRow` s, or :class:`RequestSampler` s (each then draws its uniform
    now); ``mask`` limits some rows to their allowed tokens (constrained requests; logprobs stay
    those of the model's distribution); ``extra_outputs [B]`` adds one output id per row to the
    penalties (-1: none)."""
    rows = [r.row() if isinstance(r, RequestSampler) else r for r in rows]
    logits = np.asarray(logits, dtype=np.float32)
    want_lp = [s.params.logprobs for s in rows]
    logp = log_softmax(logits) if any(n is not None for n in want_lp) else None
    x = logits
    masked = mask is not None and bool(mask.rows)
    if masked or any(s.params.has_penalties for s in rows):
        x = logits.copy()
        apply_penalties(x, rows, extra_outputs)
        if masked:
            assert mask is not None
            mask.apply(x)
    tokens = np.argmax(x, axis=1)
    rand = [r for r, s in enumerate(rows) if not s.params.greedy]
    if rand:
        ps = [rows[r].params for r in rand]
        probs = filter_probs(
            x[rand],
            np.array([p.temperature for p in ps]),
            np.array([p.top_k for p in ps], dtype=np.int64),
            np.array([p.top_p for p in ps]),
            np.array([p.min_p for p in ps]),
        )
        uniforms = np.array([rows[r].uniform for r in rand])
        tokens[rand] = draw(probs, uniforms)
    lps = top_logprobs(logp, tokens, want_lp) if logp is not None else [None] * len(rows)
    return tokens, lps
