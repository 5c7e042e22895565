"""The engine-to-event-loop bridge: streamed items reach their loop in one batch per flush, each
stream's items in order, and cancellation and closed loops hold mid-batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from llmc.runtime.bridge import RequestStream, StreamDelivery
from llmc.runtime.engine import Engine
from llmc.runtime.outputs import StreamChunk
from llmc.runtime.sampling import SamplingParams
from tests.runtime.fakes import FakeExecutor, ThreadedFakeExecutor, reference

VOCAB = 64


def _chunk(rid: str, token: int, finish: str | None = None) -> StreamChunk:
    return StreamChunk(rid, f"<{token}>", [token], finish_reason=finish)


def _counting_wakeups(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Counts ``loop.call_soon_threadsafe`` calls (the engine thread's wake-ups of the loop)."""
    calls = [0]
    original: Callable[..., asyncio.Handle] = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        calls[0] += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    return calls


def _in_thread(fn: Callable[[], None]) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_a_flush_hands_every_stream_its_items_in_order_with_one_wakeup() -> None:
    loop = asyncio.new_event_loop()
    wakeups = _counting_wakeups(loop)
    delivery = StreamDelivery()
    cancelled: list[str] = []

    async def main() -> dict[str, list[int]]:
        streams = [RequestStream(f"r{i}", cancelled.append, delivery) for i in range(5)]

        def engine_thread() -> None:  # three steps' tokens, interleaved across the streams, one flush
            for step in range(3):
                for i, s in enumerate(streams):
                    s.sink(_chunk(s.request_id, 10 * i + step, "length" if step == 2 else None))

        _in_thread(engine_thread)
        await asyncio.sleep(0.01)
        assert all(s._queue.empty() for s in streams), "nothing arrives before the flush"
        assert delivery.pending() and wakeups[0] == 0
        _in_thread(delivery.flush)
        assert not delivery.pending() and wakeups[0] == 1
        got = {}
        for s in streams:
            got[s.request_id] = [t async for c in s for t in c.token_ids]
        return got

    try:
        got = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == {f"r{i}": [10 * i, 10 * i + 1, 10 * i + 2] for i in range(5)}
    assert not cancelled
    _in_thread(delivery.flush)  # nothing pending: no wake-up
    assert wakeups[0] == 1


def test_forwarded_items_stop_after_the_last_chunk_an_error_or_a_cancel_mid_batch() -> None:
    delivery = StreamDelivery()
    cancelled: list[str] = []
    got: dict[str, list[object]] = {"ends": [], "fails": [], "cancelled": []}

    async def main() -> None:
        streams = {name: RequestStream(name, cancelled.append, delivery) for name in got}
        for name, s in streams.items():
            s.forward(got[name].append)
        ends, fails, gone = streams["ends"], streams["fails"], streams["cancelled"]
        error = RuntimeError("step failed")

        def engine_thread() -> None:
            ends.sink(_chunk("ends", 1))
            fails.sink(_chunk("fails", 1))
            gone.sink(_chunk("cancelled", 1))
            ends.sink(_chunk("ends", 2, "stop"))
            fails.sink(error)
            ends.sink(_chunk("ends", 3))  # after the last chunk: dropped
            fails.sink(_chunk("fails", 2))  # after the error: dropped
            gone.sink(_chunk("cancelled", 2))  # the client left before the batch arrived: dropped

        _in_thread(engine_thread)
        gone.cancel()  # mid-batch: after the engine delivered, before the loop dispatched
        _in_thread(delivery.flush)
        await asyncio.sleep(0.01)
        assert ends.done and fails.done and gone.done
        assert [c.token_ids for c in got["ends"]] == [[1], [2]]  # type: ignore[attr-defined]
        assert got["fails"][1] is error and len(got["fails"]) == 2
        assert got["cancelled"] == []

    asyncio.run(main())
    assert cancelled == ["cancelled"]


def test_a_failing_consumer_does_not_keep_the_other_streams_items_from_them() -> None:
    delivery = StreamDelivery()
    errors: list[dict[str, object]] = []
    got: list[StreamChunk | BaseException] = []

    def broken(item: StreamChunk | BaseException) -> None:
        raise ValueError("consumer bug")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        bad, good = RequestStream("bad", print, delivery), RequestStream("good", print, delivery)
        bad.forward(broken)
        good.forward(got.append)
        _in_thread(lambda: (bad.sink(_chunk("bad", 1)), good.sink(_chunk("good", 2)), delivery.flush()))
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert [c.token_ids for c in got] == [[2]]  # type: ignore[union-attr]
    assert len(errors) == 1 and isinstance(errors[0]["exception"], ValueError)


def test_a_closed_loop_cancels_its_streams_requests() -> None:
    delivery = StreamDelivery()
    cancelled: list[str] = []
    streams: list[RequestStream] = []

    async def main() -> None:
        streams.extend(RequestStream(f"r{i}", cancelled.append, delivery) for i in range(3))

    asyncio.run(main())  # the loop is closed when this returns
    for s in streams:
        s.sink(_chunk(s.request_id, 1))
        s.sink(_chunk(s.request_id, 2))
    delivery.flush()
    assert sorted(cancelled) == ["r0", "r1", "r2"]  # once each


@pytest.mark.parametrize("executor", [FakeExecutor, ThreadedFakeExecutor], ids=["ready", "overlapped"])
def test_the_engine_wakes_the_loop_about_once_a_step_and_cancels_mid_stream(executor: type[FakeExecutor]) -> None:
    """Eight streams through a real engine: about one wake-up per step (not one per token), each
    stream's tokens in order and equal to the reference, and a stream closed after a few tokens
    is cancelled (its blocks freed) while the others go on; with steps that overlap (a launch that
    returns before its tokens are known) too."""
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, size=int(rng.integers(2, 12)))] for _ in range(8)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    loop = asyncio.new_event_loop()
    wakeups = _counting_wakeups(loop)

    async def consume(engine: Engine, i: int) -> list[int]:
        stream = engine.open_stream(prompts[i], params, request_id=f"s{i}")
        tokens: list[int] = []
        async for chunk in stream:
            tokens += chunk.token_ids
            if i == 3 and len(tokens) == 5:
                await stream.aclose()
                break
        return tokens

    async def main(engine: Engine) -> list[list[int]]:
        return list(await asyncio.gather(*(consume(engine, i) for i in range(8))))

    with Engine(executor(vocab=VOCAB, delay=0.002)) as engine:
        try:
            got = loop.run_until_complete(main(engine))
        finally:
            loop.close()
        for _ in range(500):
            if engine.stats()["running"] == 0:
                break
            threading.Event().wait(0.002)
        stats = engine.stats()
    assert stats["requests_cancelled"] == 1 and stats["kv_used_blocks"] == 0
    for i, p in enumerate(prompts):
        expected = reference(p, 20, VOCAB)
        assert got[i] == (expected[:5] if i == 3 else expected)
    # 8 x 21 items (20 tokens and a last chunk each) came in at most one wake-up per step
    assert wakeups[0] <= stats["steps"] + 1, (wakeups[0], stats["steps"])
