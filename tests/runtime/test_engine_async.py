"""The engine over executors whose ``launch`` returns before the step has run (the overlapped path):
tokens still being sampled are deferred into the next step, stops are seen one step late, and the
results (tokens, logprobs, seeded samples, penalties), stop handling and freed KV blocks are those
of the synchronous path. tests/runtime/test_engine.py runs its whole suite in both modes too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling import SamplingParams
from tests.runtime.fakes import FakeExecutor, OnWorkerThread, ThreadedFakeExecutor, reference

VOCAB = 64


def _prompts(n: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(3, VOCAB, size=shared)]
    return [prefix + [int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(1, 30)))] for _ in range(n)]


def test_overlap_defers_tokens_and_matches_reference_under_cache_pressure() -> None:
    prompts = _prompts(16, seed=11, shared=8)
    lens = [1 + (i * 5) % 17 for i in range(16)]
    ex = ThreadedFakeExecutor(vocab=VOCAB, block_size=4, delay=0.001)
    config = EngineConfig(max_running=6, max_num_tokens=24, num_blocks=28)
    with Engine(ex, config=config) as engine:
        outs = engine.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lens])
        stats = engine.stats()
    assert [o.token_ids for o in outs] == [reference(p, n, VOCAB) for p, n in zip(prompts, lens, strict=True)]
    assert ex.deferred_launches > 0 and ex.deferred_launches >= ex.launches // 3  # really overlapped
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["kv_used_blocks"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generation_tokens"] == sum(lens)  # the tokens computed after a stop are not counted
    # no step ever ran a sequence past its last token (max_tokens is never exceeded, even by one)
    last = {i: len(p) + n for i, (p, n) in enumerate(zip(prompts, lens, strict=True))}
    for batch in ex.batches:
        for seq, ctx in zip(batch.layout.seq_ids, batch.layout.context_lens, strict=True):
            assert ctx <= last[seq]


def test_stops_seen_one_step_late_still_end_the_request_at_the_stop() -> None:
    prompts = _prompts(10, seed=12)
    sync, threaded = FakeExecutor(vocab=VOCAB, eos=2), ThreadedFakeExecutor(vocab=VOCAB, eos=2)
    params = SamplingParams(max_tokens=40, temperature=0)
    results = []
    for ex in (sync, threaded):
        with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=32)) as engine:
            results.append(engine.generate(prompts, params))
            assert engine.stats()["kv_used_blocks"] == 0
    for p, a, b in zip(prompts, *results, strict=True):
        assert a.token_ids == b.token_ids == reference(p, 40, VOCAB, eos=2)
        assert a.finish_reason == b.finish_reason
    assert threaded.deferred_launches > 0


def _sampling_params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=12, temperature=0.9, seed=7, logprobs=2),
        SamplingParams(max_tokens=9, temperature=1.3, top_k=5, seed=8, repetition_penalty=1.3),
        SamplingParams(max_tokens=14, temperature=0.8, top_p=0.7, seed=9, presence_penalty=0.5,
                       frequency_penalty=0.7),
        SamplingParams(max_tokens=11, temperature=1.0, min_p=0.2, seed=10),
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, frequency_penalty=0.4, logprobs=0),
    ]


class _SoftFake(FakeExecutor):
    """The fake model with a spread-out distribution (so temperature, top-k/p and penalties matter), each
    row's a function of its own context only (its peak, a hash of the context, seeds the rest)."""

    def step(self, batch):  # type: ignore[no-untyped-def]
        peaks = super().step(batch)
        noise = [np.random.default_rng(int(k)).normal(0, 1.0, peaks.shape[1]) for k in peaks.argmax(1)]
        return peaks * 0.4 + np.asarray(noise, dtype=np.float32).reshape(peaks.shape)


class _ThreadedSoftFake(ThreadedFakeExecutor, _SoftFake):
    pass


def test_seeded_sampling_penalties_and_logprobs_equal_sync() -> None:
    prompts = _prompts(5, seed=13) * 2
    params = _sampling_params() * 2
    outs = []
    for ex in (_SoftFake(vocab=VOCAB), _ThreadedSoftFake(vocab=VOCAB)):
        with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=16)) as engine:
            outs.append(engine.generate(prompts, params))
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None:
            assert [lp.token_id for lp in a.logprobs] == [lp.token_id for lp in b.logprobs]
            np.testing.assert_allclose([lp.logprob for lp in a.logprobs], [lp.logprob for lp in b.logprobs])


def test_torch_target_on_a_worker_thread_gives_the_sync_outputs(tiny_hf: Path, tmp_path: Path) -> None:
    """The real torch executor (CPU), its launches on a worker thread, against itself launched synchronously."""
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.loader import load_model

    art = compile_model(tiny_hf, tmp_path / "tiny", CompileOptions())
    rng = np.random.default_rng(14)
    prompts = [rng.integers(3, 128, int(n)).tolist() for n in rng.integers(2, 40, 8)]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), *_sampling_params(),
              SamplingParams(max_tokens=8, temperature=0.7, top_k=20, top_p=0.9, seed=3),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)]
    outs = []
    for wrap in (False, True):
        ex = load_model(str(art)).executor
        ex = OnWorkerThread(ex) if wrap else ex
        with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=24, num_blocks=24, block_size=None)) as e:
            outs.append(e.generate(prompts, params))
            assert e.stats()["kv_used_blocks"] == 0
        if wrap:
            assert ex.deferred_launches > 0
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason


@pytest.mark.parametrize("mode", ["sync", "worker-thread"])
def test_cancel_while_a_step_is_in_flight_frees_blocks(mode: str) -> None:
    cls = ThreadedFakeExecutor if mode == "worker-thread" else FakeExecutor
    ex = cls(vocab=VOCAB, delay=0.003)
    with Engine(ex, config=EngineConfig(max_running=4)) as engine:
        rids = [engine.submit(p, SamplingParams(max_tokens=150, temperature=0, ignore_eos=True), lambda item: None)
                for p in _prompts(4, seed=15)]
        while engine.stats()["generation_tokens"] < 8:
            pass
        for rid in rids:
            engine.cancel(rid)
        for _ in range(2000):
            stats = engine.stats()
            if stats["requests_cancelled"] == 4:
                break
            import time

            time.sleep(0.001)
        assert stats["requests_cancelled"] == 4 and stats["kv_used_blocks"] == 0 and stats["running"] == 0
