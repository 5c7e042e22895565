"""Perplexity and reference divergence of an executor over a token sequence."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from llmc.compiler.errors import RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.errors import TokenIdError
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.loader import kv_blocks_for
from llmc.runtime.sampling import log_softmax

__all__ = ["EvalResult", "evaluate", "log_softmax", "reference_logits", "score", "scored_logits"]


def scored_logits(executor: Executor, ids: list[int], window: int | None = None,
                  chunk: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(position, logits)`` predicting ``ids[position]`` for every position >= 1.

    Texts longer than the context use a sliding window with half-window stride: each token is
    scored once, with at least half a window of context (except at the start).
    """
    config = executor.config
    window = min(window or config.max_position, config.max_position, max(2, len(ids)))  # no cache beyond the text
    if len(ids) < 2:
        raise RequestError("need at least two tokens to score")
    spec = executor.kv_spec()
    allocator = BlockAllocator(kv_blocks_for(spec, 1, window), spec.block_size)
    executor.init_cache(allocator.num_blocks)
    stride = max(window // 2, 1)
    scored_until = 1  # next position to score
    start = 0
    while scored_until < len(ids):
        end = min(start + window, len(ids))
        table = allocator.allocate(kv_blocks_for(spec, 1, end - start))
        for c0 in range(start, end, chunk):
            c1 = min(c0 + chunk, end)
            layout = BatchLayout((0,), (c1 - c0,), (c1 - start,))
            rows = np.arange(c1 - c0)
            logits = executor.step(StepBatch(np.asarray(ids[c0:c1]), layout, [table], rows))
            for r in range(c1 - c0):
                target = c0 + r + 1
                if scored_until <= target < end:
                    yield target, logits[r]
            scored_until = max(scored_until, min(c1 + 1, end))
        allocator.free(table)
        if end == len(ids):
            break
        start += stride


@dataclass
class EvalResult:
    tokens: int
    mean_nll: float
    perplexity: float
    kl_mean: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "tokens": self.tokens,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "kl_mean": self.kl_mean,
            "top1_agreement": self.top1_agreement,
        }


def reference_logits(executor: Executor, ids: list[int], window: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Every ``(position, logits)`` of :func:`scored_logits`, kept to compare many models against."""
    return [(pos, np.asarray(logits, dtype=np.float32).copy()) for pos, logits in scored_logits(executor, ids, window)]


def evaluate(executor: Executor, ids: list[int], reference: Executor | list[tuple[int, np.ndarray]] | None = None,
             window: int | None = None) -> EvalResult:
    """Mean NLL and perplexity; with ``reference`` (an executor, or logits from :func:`reference_logits`
    over the same ids and window), mean KL(reference || model) and top-1 agreement."""
    vocab = executor.config.vocab_size
    if isinstance(reference, Executor) and reference.config.vocab_size != vocab:
        raise RequestError(
            f"the reference model has a vocabulary of {reference.config.vocab_size} tokens, this one {vocab}: "
            "KL divergence needs the same tokenizer"
        )
    TokenIdError.check(ids, vocab)
    ref_iter: Iterator[tuple[int, np.ndarray]] | None = None
    if isinstance(reference, Executor):
        ref_iter = scored_logits(reference, ids, window)
    elif reference is not None:
        ref_iter = iter(reference)
    return score(scored_logits(executor, ids, window), ids, ref_iter)


def score(scored: Iterable[tuple[int, np.ndarray]], ids: list[int],
          ref_iter: Iterator[tuple[int, np.ndarray]] | None = None) -> EvalResult:
    """Mean NLL, perplexity (and KL/top-1 against ``ref_iter``) of ``(position, logits)`` pairs."""
    nll: list[float] = []
    kls: list[float] = []
    agree = 0
    for position, logits in scored:
        logp = log_softmax(logits)
        nll.append(-float(logp[ids[position]]))
        if ref_iter is not None:
            ref_pos, ref_logits = next(ref_iter, (-1, None))
            if ref_pos != position or ref_logits is None:
                raise RequestError("the reference logits do not cover the same tokens and window")
            ref_logp = log_softmax(ref_logits)
            kls.append(float(np.sum(np.exp(ref_logp) * (ref_logp - logp))))
            agree += int(np.argmax(ref_logits) == np.argmax(logits))
    mean = float(np.mean(nll))
    return EvalResult(
        tokens=len(nll),
        mean_nll=mean,
        perplexity=float(np.exp(mean)),
        kl_mean=float(np.mean(kls)) if kls else None,
        top1_agreement=agree / len(nll) if ref_iter is not None else None,
    )
