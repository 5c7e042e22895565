"""Engine mechanics over a fake executor: batching, KV exhaustion, cancellation, streaming, errors.

Every test runs twice: with the fake's synchronous ``launch`` (the contract's default) and with
launches on a worker thread (``ThreadedFakeExecutor``), where the engine overlaps steps and defers
the tokens still being sampled; both must give the same results."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from llmc.errors import RequestError
from llmc.runtime.engine import Engine, EngineConfig, QueueFullError
from llmc.runtime.sampling import SamplingParams
from tests.runtime import fakes
from tests.runtime.fakes import FakeExecutor, ThreadedFakeExecutor, reference

VOCAB = 64


@pytest.fixture(autouse=True, params=["sync", "worker-thread"])
def launch_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``FakeExecutor`` in these tests is the synchronous fake or the one launching on a worker thread."""
    if request.param == "worker-thread":
        monkeypatch.setitem(globals(), "FakeExecutor", ThreadedFakeExecutor)
    else:
        monkeypatch.setitem(globals(), "FakeExecutor", fakes.FakeExecutor)
    return str(request.param)


def _prompts(n: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(3, VOCAB, size=shared)]
    return [prefix + [int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(1, 30)))] for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("layout", ["paged", "slots"])
def test_concurrent_requests_match_reference(layout: str) -> None:
    prompts = _prompts(24, shared=9)
    lens = [1 + (i * 7) % 23 for i in range(24)]
    ex = FakeExecutor(vocab=VOCAB, layout=layout)
    with Engine(ex, config=EngineConfig(max_running=8, max_num_tokens=32)) as engine:
        outs = engine.generate(prompts, [_greedy(n) for n in lens])
        stats = engine.stats()
    for p, n, out in zip(prompts, lens, outs, strict=True):
        assert out.token_ids == reference(p, n, VOCAB)
        assert out.prompt_token_ids == p and out.finish_reason == "length"
    assert stats["kv_used_blocks"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["generation_tokens"] == sum(lens) and stats["requests_finished"] == 24
    assert max(len(b.layout.seq_ids) for b in ex.batches) > 1  # really batched
    assert all(b.layout.num_tokens <= 32 for b in ex.batches)  # token budget
    if layout == "paged":
        assert stats["prefix_cache_hits"] > 0  # the shared 9-token prefix was reused


def test_stats_count_decode_and_prompt_steps_and_the_time_in_the_executor() -> None:
    delay = 0.02
    ex = FakeExecutor(vocab=VOCAB, delay=delay)
    with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=32)) as engine:
        t0 = time.perf_counter()
        out = engine.generate([[5, 6, 7, 8, 9]], _greedy(6))[0]
        wall = time.perf_counter() - t0
        stats = engine.stats()
    assert len(out.token_ids) == 6
    # the prompt's step samples the first token; each of the other five is a decode step
    assert (stats["other_steps"], stats["decode_steps"], stats["steps"]) == (1, 5, 6)
    # each step sleeps `delay` in the executor: the loop waits most of it (overlapped launches: less)
    assert 0.5 * 5 * delay <= stats["decode_executor_s"] <= wall
    assert 0.5 * delay <= stats["other_executor_s"] <= wall


def test_kv_exhaustion_queues_and_preempts() -> None:
    prompts = _prompts(12, seed=1)
    ex = FakeExecutor(vocab=VOCAB, block_size=4)
    # 16 blocks = 64 tokens for 12 requests of up to ~60 tokens each
    with Engine(ex, config=EngineConfig(max_running=6, max_num_tokens=24, num_blocks=16)) as engine:
        outs = engine.generate(prompts, _greedy(30))
        stats = engine.stats()
    for p, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference(p, 30, VOCAB)
    assert stats["num_preemptions"] > 0
    assert stats["kv_used_blocks"] == 0


def test_prefix_cache_off_gives_same_outputs() -> None:
    prompts = _prompts(6, seed=2, shared=12)
    ex = FakeExecutor(vocab=VOCAB)
    with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=16, prefix_caching=False)) as engine:
        outs = engine.generate(prompts, _greedy(10))
        assert engine.stats()["prefix_cache_hits"] == 0
    assert [o.token_ids for o in outs] == [reference(p, 10, VOCAB) for p in prompts]


def test_stop_token_and_eos() -> None:
    ex = FakeExecutor(vocab=VOCAB, eos=2)
    prompts = _prompts(8, seed=3)
    with Engine(ex) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
        first = reference(prompts[0], 40, VOCAB)[3]
        stopped = engine.generate([prompts[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                               stop_token_ids=[first]))[0]
    for p, out in zip(prompts, outs, strict=True):
        ref = reference(p, 40, VOCAB, eos=2)
        assert out.token_ids == ref
        assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
    assert stopped.finish_reason == "stop" and stopped.stop_reason == first
    assert stopped.token_ids[-1] == first


def test_cancel_frees_blocks() -> None:
    ex = FakeExecutor(vocab=VOCAB, delay=0.002)
    with Engine(ex, config=EngineConfig(max_running=4)) as engine:
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(engine.generate(_prompts(3), _greedy(200 - 30))))
        worker.start()
        while engine.stats()["running"] < 3:
            pass
        assert engine.cancel("req-0") and engine.cancel("req-2")
        worker.join()
        stats = engine.stats()
        assert not engine.cancel("req-0")  # already done
    assert [r.finish_reason for r in results] == ["cancelled", "length", "cancelled"]
    assert stats["kv_used_blocks"] == 0 and stats["requests_cancelled"] == 2


def test_stream_and_task_cancellation() -> None:
    ex = FakeExecutor(vocab=VOCAB, delay=0.002)
    prompt = _prompts(1, seed=4)[0]

    async def main(engine: Engine) -> tuple[list, int]:
        chunks = [c async for c in engine.stream(prompt, _greedy(12))]

        async def consume() -> None:
            async for _ in engine.stream(prompt, _greedy(150)):
                pass

        task = asyncio.create_task(consume())
        while engine.stats()["running"] == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.002)
        used = engine.stats()["kv_used_blocks"]
        async for _ in engine.stream(prompt, _greedy(150)):
            break  # leaving the loop early closes the generator, which cancels the request
        for _ in range(500):
            if engine.stats()["requests_cancelled"] == 2:
                break
            await asyncio.sleep(0.002)
        return chunks, used

    with Engine(ex) as engine:
        chunks, used = asyncio.run(main(engine))
        assert engine.stats()["requests_cancelled"] == 2
        assert engine.stats()["kv_used_blocks"] == 0
    assert [t for c in chunks for t in c.token_ids] == reference(prompt, 12, VOCAB)
    assert chunks[-1].finish_reason == "length" and chunks[-1].output is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert used == 0


def test_request_errors() -> None:
    ex = FakeExecutor(vocab=VOCAB, max_position=64)
    with Engine(ex, config=EngineConfig(num_blocks=8, max_queue=2)) as engine:
        with pytest.raises(RequestError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) exceeds the context of 64"):
            engine.generate([[5] * 60], _greedy(10))
        with pytest.raises(RequestError, match="empty"):
            engine.generate([[]], _greedy(1))
        with pytest.raises(RequestError, match="outside the vocabulary"):
            engine.generate([[VOCAB + 1]], _greedy(1))
        with pytest.raises(RequestError, match="whole kv cache"):
            engine.generate([[5] * 30], _greedy(10))  # 40 tokens > 8 blocks of 4
        with pytest.raises(RequestError, match="tokenizer"):
            engine.generate(["text"], _greedy(1))
        ex.gate = threading.Event()
        engine.submit([5], _greedy(1), lambda item: None)
        engine.submit([6], _greedy(1), lambda item: None)
        with pytest.raises(QueueFullError):
            engine.submit([7], _greedy(1), lambda item: None)
        ex.gate.set()


def test_executor_failure_is_reported_and_engine_survives() -> None:
    ex = FakeExecutor(vocab=VOCAB, fail_on=63)
    with Engine(ex) as engine:
        with pytest.raises(RuntimeError, match="fake executor failure"):
            engine.generate([[63, 5]], _greedy(3))
        out = engine.generate([[4, 5]], _greedy(3))[0]
        assert out.token_ids == reference([4, 5], 3, VOCAB)
        assert engine.stats()["kv_used_blocks"] == 0


def test_seeded_sampling_is_batch_independent() -> None:
    prompts = _prompts(6, seed=5)
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=1234)
    ex = FakeExecutor(vocab=VOCAB)
    with Engine(ex) as engine:
        alone = engine.generate([prompts[0]], params)[0].token_ids
        batched = engine.generate(prompts, params)[0].token_ids
        other = engine.generate([prompts[0]], SamplingParams(max_tokens=15, temperature=1.0, seed=99))[0].token_ids
    assert alone == batched
    assert alone != other


def test_config_errors() -> None:
    with pytest.raises(Exception, match="unknown engine option"):
        EngineConfig.from_kwargs(max_runing=3)
    with pytest.raises(Exception, match="max_num_tokens"):
        Engine(FakeExecutor(), config=EngineConfig(max_running=8, max_num_tokens=4))


def test_random_cancellations_under_cache_pressure() -> None:
    import random
    import time

    rng = random.Random(0)
    prompts = _prompts(40, seed=6, shared=5)
    ex = FakeExecutor(vocab=VOCAB, block_size=4, delay=0.0005)
    done: dict[str, object] = {}
    lock = threading.Lock()

    def sink_for(rid: str):
        def sink(item: object) -> None:
            with lock:
                done[rid] = item
        return sink

    with Engine(ex, config=EngineConfig(max_running=8, max_num_tokens=20, num_blocks=24)) as engine:
        rids = [engine.submit(p, _greedy(25), sink_for(f"r{i}"), request_id=f"r{i}") for i, p in enumerate(prompts)]
        cancelled = set(rng.sample(rids, 12))
        for rid in cancelled:
            time.sleep(rng.random() * 0.01)
            engine.cancel(rid)
        while True:
            with lock:
                if len(done) == len(rids):
                    break
            time.sleep(0.005)
        stats = engine.stats()
    for i, rid in enumerate(rids):
        out = done[rid]
        if out.finish_reason == "cancelled":
            assert rid in cancelled
        else:
            assert out.token_ids == reference(prompts[i], 25, VOCAB)
    assert stats["kv_used_blocks"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["requests_finished"] + stats["requests_cancelled"] == 40


def test_logprobs_are_collected_per_token() -> None:
    prompt = _prompts(1, seed=7)[0]
    with Engine(FakeExecutor(vocab=VOCAB)) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2))[0]
        plain = engine.generate([prompt], _greedy(5))[0]
    assert plain.logprobs is None
    assert out.logprobs is not None and [lp.token_id for lp in out.logprobs] == out.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in out.logprobs)
    assert out.to_dict()["logprobs"][0]["token_id"] == out.token_ids[0]


class _InternalPagingExecutor(FakeExecutor):
    """Like tvm: pages its cache itself, so block tables only count capacity."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.released: list[int] = []

    def kv_spec(self):  # type: ignore[no-untyped-def]
        spec = super().kv_spec()
        return type(spec)(spec.layout, spec.block_size, spec.bytes_per_block, spec.max_blocks_per_seq,
                          uses_block_tables=False)

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


def test_internal_paging_executor_gets_releases_and_no_prefix_sharing() -> None:
    prompts = _prompts(5, seed=4, shared=12)
    ex = _InternalPagingExecutor(vocab=VOCAB)
    with Engine(ex, config=EngineConfig(max_running=2, max_num_tokens=16)) as engine:
        outs = engine.generate(prompts, _greedy(6))
        assert engine.stats()["prefix_cache_hits"] == 0
    assert [o.token_ids for o in outs] == [reference(p, 6, VOCAB) for p in prompts]
    seqs = {s for b in ex.batches for s in b.layout.seq_ids}
    assert seqs <= set(ex.released) and len(ex.released) >= len(prompts)


def test_refusals_are_typed_and_carry_the_numbers() -> None:
    from llmc.runtime.errors import (
        ContextLengthError,
        EmptyPromptError,
        EngineClosedError,
        KVCacheTooSmallError,
        TokenIdError,
    )

    ex = FakeExecutor(vocab=VOCAB, max_position=64)
    engine = Engine(ex, config=EngineConfig(num_blocks=8, max_queue=1))
    with engine:
        with pytest.raises(ContextLengthError) as too_long:
            engine.submit([5] * 60, _greedy(10), lambda item: None)
        assert (too_long.value.prompt_tokens, too_long.value.max_tokens, too_long.value.context_length) == (60, 10, 64)
        with pytest.raises(ContextLengthError, match="leaves no room") as no_room:
            engine.submit([5] * 64, SamplingParams(max_tokens=None), lambda item: None)
        assert (no_room.value.prompt_tokens, no_room.value.max_tokens) == (64, None)
        with pytest.raises(TokenIdError) as oov:
            engine.submit([1, VOCAB, VOCAB + 7], _greedy(1), lambda item: None)
        assert (oov.value.token_ids, oov.value.vocab_size) == ([VOCAB, VOCAB + 7], VOCAB)
        with pytest.raises(EmptyPromptError):
            engine.submit([], _greedy(1), lambda item: None)
        with pytest.raises(KVCacheTooSmallError) as small:
            engine.submit([5] * 30, _greedy(10), lambda item: None)
        assert (small.value.tokens, small.value.num_blocks, small.value.block_size) == (40, 8, 4)
        ex.gate = threading.Event()
        engine.submit([5], _greedy(1), lambda item: None)
        with pytest.raises(QueueFullError) as full:
            engine.submit([6], _greedy(1), lambda item: None)
        assert full.value.max_queue == 1
        ex.gate.set()
        assert engine.is_alive()
    assert not engine.is_alive()
    with pytest.raises(EngineClosedError):
        engine.submit([5], _greedy(1), lambda item: None)


def test_max_tokens_none_generates_to_the_end_of_the_context() -> None:
    prompt = _prompts(1, seed=8)[0]
    with Engine(FakeExecutor(vocab=VOCAB, max_position=64)) as engine:
        out = engine.generate([prompt], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert out.token_ids == reference(prompt, 64 - len(prompt), VOCAB)


def test_open_stream_submits_at_once_and_cancels_on_close() -> None:
    ex = FakeExecutor(vocab=VOCAB, delay=0.002)
    prompt = _prompts(1, seed=9)[0]

    async def main(engine: Engine) -> list:
        with pytest.raises(RequestError, match="empty"):
            engine.open_stream([], _greedy(3))  # refused before anything is awaited
        chunks = [c async for c in engine.open_stream(prompt, _greedy(5), request_id="whole")]
        stream = engine.open_stream(prompt, _greedy(150), request_id="left")
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(500):
            if engine.stats()["requests_cancelled"] == 1:
                break
            await asyncio.sleep(0.002)
        return chunks

    with Engine(ex) as engine:
        chunks = asyncio.run(main(engine))
        assert engine.stats()["requests_cancelled"] == 1 and engine.stats()["kv_used_blocks"] == 0
    assert [t for c in chunks for t in c.token_ids] == reference(prompt, 5, VOCAB)
    assert chunks[-1].output is not None and chunks[-1].output.request_id == "whole"


def test_an_engine_nobody_holds_stops_its_thread() -> None:
    import gc

    before = set(threading.enumerate())
    engine = Engine(FakeExecutor(vocab=VOCAB))
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "llmc-engine"]
    assert engine.generate([[4, 5]], _greedy(2))[0].token_ids == reference([4, 5], 2, VOCAB)
    del engine
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
