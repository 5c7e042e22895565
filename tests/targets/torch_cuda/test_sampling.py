"""Sampling on the device (torch ops) against the host sampler (NumPy), row for row: same tokens from the
same uniforms for every knob (penalties counting a deferred output token too, temperature, top-k, top-p,
min-p, greedy), and the same logprobs. Runs on CPU tensors, and on the GPU when there is one."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.runtime.sampling import RequestSampler, SamplingParams, sample_batch

torch = pytest.importorskip("torch")

from llmc.targets.torch.cuda.sampling import sample  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_params(rng: np.random.Generator, vocab: int) -> SamplingParams:
    kind = rng.integers(0, 8)
    kw: dict = {"temperature": float(rng.choice([0.0, 0.3, 0.7, 1.0, 1.6])), "seed": int(rng.integers(0, 2**32))}
    if kind in (1, 5):
        kw["top_k"] = int(rng.choice([1, 2, 5, vocab - 1, vocab, vocab + 3]))
    if kind in (2, 5, 6):
        kw["top_p"] = float(rng.choice([0.1, 0.5, 0.9, 1.0]))
    if kind in (3, 6):
        kw["min_p"] = float(rng.choice([0.05, 0.2, 0.5]))
    if kind in (4, 7):
        kw["repetition_penalty"] = float(rng.choice([0.8, 1.0, 1.3, 2.0]))
        kw["presence_penalty"] = float(rng.choice([0.0, 0.5, -1.0]))
        kw["frequency_penalty"] = float(rng.choice([0.0, 0.7, 2.0]))
    if rng.random() < 0.3:
        kw["logprobs"] = int(rng.integers(0, 5))
    return SamplingParams(max_tokens=8, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_device_sampler_picks_the_host_samplers_tokens(device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab, rows = int(rng.choice([7, 50, 1000])), 24
    logits = (rng.standard_normal((rows, vocab)) * rng.choice([0.5, 2.0, 6.0])).astype(np.float32)
    logits[0, :3] = logits[0].max() + 1.0  # exact ties at the top
    samplers = []
    for _ in range(rows):
        s = RequestSampler(_random_params(rng, vocab), rng.integers(0, vocab, int(rng.integers(1, 9))).tolist(), set())
        s.output_ids = rng.integers(0, vocab, int(rng.integers(0, 12))).tolist()
        samplers.append(s)
    sample_rows = [s.row() for s in samplers]  # the uniforms are drawn once, here, as the engine does
    extra = np.where(rng.random(rows) < 0.5, rng.integers(0, vocab, rows), -1)  # deferred outputs
    for ex in (None, extra):
        want, want_lp = sample_batch(logits, sample_rows, extra_outputs=ex)
        got, got_lp = sample(torch.from_numpy(logits).to(device), sample_rows,
                             None if ex is None else torch.from_numpy(ex).to(device))
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        host_lp = got_lp.to("cpu").unpack(got.cpu().numpy(), rows) if got_lp is not None else [None] * rows
        for a, b in zip(host_lp, want_lp, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-9
                assert [i for i, _ in a.top] == [i for i, _ in b.top] or np.allclose([v for _, v in a.top],
                                                                                        [v for _, v in b.top])


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_request_samples_the_same_sequence_on_either_side(device: str) -> None:
    rng = np.random.default_rng(9)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, top_k=40, seed=1234, repetition_penalty=1.2)
    host, dev = RequestSampler(params, [1, 2, 3], set()), RequestSampler(params, [1, 2, 3], set())
    for _ in range(20):
        logits = rng.standard_normal((1, 200)).astype(np.float32)
        a = sample_batch(logits, [host.row()])[0][0]
        b = int(sample(torch.from_numpy(logits).to(device), [dev.row()])[0][0])
        assert a == b
        host.check_stop(int(a))
        dev.check_stop(b)
