"""The batched sampler: masks on known distributions, penalties, seeds, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.errors import RequestError
from llmc.runtime.sampling import RequestSampler, SamplingParams, draw, filter_probs, log_softmax, sample_batch

P = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))


def _filter(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    n = logits.shape[0]
    return filter_probs(logits, np.full(n, temperature), np.full(n, top_k), np.full(n, top_p), np.full(n, min_p))


def test_top_k_mask() -> None:
    probs = _filter(np.array([[4.0, 3.0, 2.0, 1.0, 0.0]]), top_k=2)[0]
    assert np.all(probs[2:] == 0)
    assert probs[0] / probs[1] == pytest.approx(np.e)


def test_top_p_mask() -> None:
    probs = _filter(P, top_p=0.7)[0]
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert _filter(P, top_p=0.01)[0].tolist() == [1.0, 0, 0, 0]  # the top token always stays


def test_min_p_mask() -> None:
    probs = _filter(P, min_p=0.35)[0]  # threshold 0.175
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_temperature_sharpens() -> None:
    cold = _filter(P, temperature=0.5)[0]
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(cold, p2 / p2.sum())


def test_per_row_parameters_in_one_batch() -> None:
    logits = np.repeat(P, 3, axis=0)
    probs = filter_probs(logits, np.ones(3), np.array([1, 0, 0]), np.array([1.0, 0.7, 1.0]), np.array([0, 0, 0.35]))
    assert probs[0].tolist() == [1.0, 0, 0, 0]
    np.testing.assert_allclose(probs[1], [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(probs[2], [0.625, 0.375, 0, 0])


def test_draw_frequencies() -> None:
    probs = np.repeat(np.array([[0.5, 0.0, 0.3, 0.2]]), 20000, axis=0)
    picks = draw(probs, np.random.default_rng(0).random(20000))
    freq = np.bincount(picks, minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.0, 0.3, 0.2], atol=0.015)
    assert draw(probs[:1], np.array([0.0]))[0] == 0 and draw(probs[:1], np.array([0.9999999]))[0] == 3


def _sampler(**kw) -> RequestSampler:
    return RequestSampler(SamplingParams(**kw), kw.pop("prompt", [0]), set())


def test_penalties() -> None:
    logits = np.array([[2.0, -1.0, 1.0, 0.5]], dtype=np.float32)
    s = RequestSampler(SamplingParams(temperature=0, repetition_penalty=4.0), [0, 1], set())
    tok, _ = sample_batch(logits, [s])
    assert tok[0] == 2  # 2.0 -> 0.5 (prompt token), so token 2 (1.0) wins
    s = RequestSampler(SamplingParams(temperature=0, presence_penalty=0.4, frequency_penalty=0.6), [3], set())
    s.output_ids = [0, 0, 2]
    x = logits.copy()
    from llmc.runtime.sampling import apply_penalties

    apply_penalties(x, [s])
    np.testing.assert_allclose(x[0], [2.0 - 1.2 - 0.4, -1.0, 1.0 - 0.6 - 0.4, 0.5], rtol=1e-6)
    assert sample_batch(logits, [s])[0][0] == 3
    neg = RequestSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [1], set())
    y = logits.copy()
    apply_penalties(y, [neg])
    assert y[0, 1] == -2.0  # negative logits are multiplied


def test_greedy_rows_ignore_their_generator() -> None:
    logits = np.array([[0.0, 3.0, 1.0]], dtype=np.float32)
    assert sample_batch(logits, [_sampler(temperature=0)])[0][0] == 1
    assert sample_batch(logits, [_sampler(temperature=1.0, top_k=1)])[0][0] == 1


def test_seeded_requests_reproduce_whatever_the_batch() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 50)).astype(np.float32) * 2
    kw = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}
    alone = [sample_batch(logits[:1], [_sampler(**kw)])[0][0]]
    a = _sampler(**kw)
    together = sample_batch(logits, [a] + [_sampler(temperature=1.0) for _ in range(4)])[0][0]
    assert together == alone[0]
    s1, s2 = _sampler(**kw), _sampler(**kw)
    seq1 = [sample_batch(logits, [s1] * 5)[0].tolist() for _ in range(5)]
    seq2 = [sample_batch(logits, [s2] * 5)[0].tolist() for _ in range(5)]
    assert seq1 == seq2
    s3 = _sampler(**{**kw, "seed": 8})
    assert seq1 != [sample_batch(logits, [s3] * 5)[0].tolist() for _ in range(5)]


def test_logprobs() -> None:
    logits = np.array([[1.0, 3.0, 2.0, 0.0]], dtype=np.float32)
    _, lps = sample_batch(np.repeat(logits, 2, axis=0), [_sampler(temperature=0, logprobs=2), _sampler(temperature=0)])
    expected = log_softmax(logits)[0]
    assert lps[1] is None
    lp = lps[0]
    assert lp.token_id == 1 and lp.logprob == pytest.approx(expected[1])
    assert [t for t, _ in lp.top] == [1, 2]
    assert lp.top[1][1] == pytest.approx(expected[2])


def test_stop_checks() -> None:
    s = RequestSampler(SamplingParams(max_tokens=3), [1], {2, 9})
    assert s.check_stop(5) is None
    assert s.check_stop(9) == "stop"
    s = RequestSampler(SamplingParams(max_tokens=2), [1], set())
    assert s.check_stop(5) is None and s.check_stop(6) == "length"


@pytest.mark.parametrize("kw", [
    {"max_tokens": 0}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 1.0},
    {"repetition_penalty": 0}, {"presence_penalty": 3}, {"logprobs": 21}, {"stop": [""]},
])
def test_bad_params(kw: dict) -> None:
    with pytest.raises(RequestError):
        SamplingParams(**kw)


def test_stop_accepts_a_string() -> None:
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
