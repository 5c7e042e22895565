"""Prompt logprobs: computed in the engine's prefill (chunked or not, beside other requests, never
from prefix-cache hits), equal to the log-softmax of the executor's prefill logits and, summed
over a continuation, to ``llmc eval``'s NLL of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmc.runtime.engine import Engine
from llmc.runtime.errors import ContextLengthError
from llmc.runtime.evaluate import evaluate, scored_logits
from llmc.runtime.loader import LoadedModel, load_model
from llmc.runtime.sampling import SamplingParams, log_softmax
from tests.runtime.fakes import FakeExecutor

TOL = 1e-4  # fp32 logits from differently shaped batches (chunks, other rows) agree to ~1e-6 in log space


@pytest.fixture(scope="module")
def model(chat_model: tuple[Path, Path]) -> LoadedModel:
    """A second copy of the artifact, for the reference computations (evaluate owns its cache)."""
    return load_model(str(chat_model[1]))


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 99, size=n)]


def _reference(model: LoadedModel, ids: list[int]) -> np.ndarray:
    """Log-softmax of every prefill row: row ``p - 1`` scores token ``p``."""
    rows = dict(scored_logits(model.executor, ids))
    return log_softmax(np.stack([rows[p] for p in range(1, len(ids))]))


@pytest.mark.parametrize("max_num_tokens", [512, 16])  # one prefill, or chunks of 16 mixed with other requests
def test_prompt_logprobs_are_the_prefill_log_softmax(chat_model: tuple[Path, Path], model: LoadedModel,
                                                      max_num_tokens: int) -> None:
    prompts = [_prompt(45, 1), _prompt(30, 2)]
    with Engine.load(str(chat_model[1]), max_running=4, max_num_tokens=max_num_tokens) as engine:
        outs = engine.generate(
            [*prompts, _prompt(20, 3)],
            [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3),
             SamplingParams(max_tokens=0, prompt_logprobs=0),
             SamplingParams(max_tokens=5, temperature=0)])  # a request without them in the same steps
    assert outs[2].prompt_logprobs is None
    assert outs[1].token_ids == [] and outs[1].finish_reason == "length"
    for ids, out, top in zip(prompts, outs, (3, 0), strict=False):
        ref = _reference(model, ids)
        scored = out.prompt_logprobs
        assert scored is not None and len(scored) == len(ids) and scored[0] is None
        for p in range(1, len(ids)):
            lp = scored[p]
            assert lp is not None and lp.token_id == ids[p]
            assert lp.logprob == pytest.approx(ref[p - 1, ids[p]], abs=TOL)
            assert len(lp.top) == top
            best = np.argsort(-ref[p - 1], kind="stable")[:top]
            assert [v for _, v in lp.top] == pytest.approx(list(ref[p - 1, best]), abs=TOL)


def test_continuation_sum_equals_eval_nll(chat_model: tuple[Path, Path], model: LoadedModel) -> None:
    context, continuation = _prompt(25, 4), _prompt(12, 5)
    with Engine.load(str(chat_model[1])) as engine:
        out = engine.generate([context + continuation], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.prompt_logprobs is not None
    summed = -sum(lp.logprob for lp in out.prompt_logprobs[len(context):] if lp is not None)
    whole, head = evaluate(model.executor, context + continuation), evaluate(model.executor, context)
    eval_nll = whole.mean_nll * whole.tokens - head.mean_nll * head.tokens  # causal: the context's NLL is shared
    assert summed == pytest.approx(eval_nll, abs=1e-3)
    assert -sum(lp.logprob for lp in out.prompt_logprobs[1:] if lp is not None) == pytest.approx(
        whole.mean_nll * whole.tokens, abs=1e-3)


def test_prefix_cache_hits_never_replace_rows_to_score() -> None:
    ex = FakeExecutor(vocab=64, block_size=4)
    prompt = [int(t) for t in np.random.default_rng(6).integers(3, 64, size=23)]
    with Engine(ex) as engine:
        plain = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))[0]
        again = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))[0]
        scored = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))[0]
    assert plain.num_cached_tokens == 0 and again.num_cached_tokens == 20  # the cache holds the prompt
    assert scored.num_cached_tokens == 0  # ... but the scored request computed every row
    assert scored.token_ids == plain.token_ids
    assert scored.prompt_logprobs is not None and len(scored.prompt_logprobs) == len(prompt)
    last = ex.batches[-2]  # the scored request's prefill: all its rows came back
    assert list(last.logits_rows) == list(range(len(prompt)))


def test_max_tokens_zero_needs_prompt_logprobs(chat_model: tuple[Path, Path]) -> None:
    from llmc.errors import RequestError

    with pytest.raises(RequestError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="prompt_logprobs must be an integer between 0 and 20"):
        SamplingParams(prompt_logprobs=21)
    with Engine(FakeExecutor(vocab=64, max_position=32)) as engine:
        with pytest.raises(ContextLengthError):
            engine.submit([5] * 32, SamplingParams(max_tokens=1, prompt_logprobs=0), lambda _: None)
        out = engine.generate([[5] * 32], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]  # scoring fits
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == 32
