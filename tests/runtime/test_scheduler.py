"""Scheduler invariants under random arrivals (hypothesis), without a model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmc.runtime.kv_cache import PagedKVCache, SlotKVCache
from llmc.runtime.scheduler import Scheduler, SeqStatus, Sequence

requests = st.lists(  # (arrival step, prompt length, output length, shared prefix blocks)
    st.tuples(st.integers(0, 30), st.integers(1, 40), st.integers(1, 25), st.integers(0, 3)),
    min_size=1, max_size=25,
)


def _simulate(reqs: list[tuple[int, int, int, int]], kv, max_running: int, budget: int) -> None:
    pending = sorted(enumerate(reqs), key=lambda r: r[1][0])
    seqs: dict[int, tuple[Sequence, int]] = {}
    finished: dict[int, int] = {}
    sched = Scheduler(kv, max_running, budget)
    bound = 40 + sum(p + o for _, (_, p, o, _) in pending) * 4
    for step in range(bound):
        while pending and pending[0][1][0] <= step:
            i, (_, plen, out, prefix) = pending.pop(0)
            prompt = [7] * (prefix * 4) + [i * 100 + k for k in range(plen)]
            seq = Sequence(i, prompt, len(prompt), arrival=i)
            seqs[i] = (seq, out)
            sched.add(seq)
        if not pending and not sched.has_work():
            break
        decoding = [s for s in sched.running if s.num_remaining == 1]
        out = sched.schedule()
        # the budget and the running cap hold
        assert out.num_tokens <= budget
        assert len(sched.running) <= max_running
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        # decode-first: every running decode is scheduled unless it was preempted
        scheduled = {s.seq.seq_id for s in out.scheduled}
        for s in decoding:
            assert s.seq_id in scheduled or s in out.preempted
        # chunks never go past the known tokens and start at the computed position
        for s in out.scheduled:
            assert s.start == s.seq.num_computed and s.start + s.num_new <= s.seq.num_tokens
        sched.step_done(out)
        for s in out.scheduled:
            if s.sample:
                seq, want = seqs[s.seq.seq_id]
                seq.token_ids.append(10_000 + len(seq.output_ids))
                if len(seq.output_ids) >= want:
                    sched.finish(seq)
                    finished[seq.seq_id] = step
    # every request finished (no starvation, no livelock) and every block is free again
    assert sorted(finished) == sorted(seqs) and not pending
    assert all(s.status == SeqStatus.FINISHED for s, _ in seqs.values())
    assert kv.stats().used_blocks == 0


@given(requests, st.integers(1, 6), st.integers(0, 3), st.booleans())
def test_paged_scheduler_invariants(reqs, max_running, extra_budget, prefix_caching) -> None:
    budget = max_running + extra_budget * 5
    kv = PagedKVCache(num_blocks=20, block_size=4, prefix_caching=prefix_caching)  # 80 tokens: often full
    _simulate(reqs, kv, max_running, budget)


@given(requests, st.integers(1, 6))
def test_slot_scheduler_invariants(reqs, max_running) -> None:
    _simulate(reqs, SlotKVCache(num_slots=max_running, max_tokens=80), max_running, max_running + 8)


def test_long_prompt_does_not_stall_running_decodes() -> None:
    kv = PagedKVCache(num_blocks=200, block_size=4)
    sched = Scheduler(kv, max_running=4, max_num_tokens=16)
    a = Sequence(0, [1, 2, 3], 3, arrival=0)
    sched.add(a)
    sched.step_done(sched.schedule())
    a.token_ids.append(9)  # a is decoding now
    b = Sequence(1, list(range(100)), 100, arrival=1)
    sched.add(b)
    for _ in range(6):  # b's prompt takes several chunks; a decodes in every one of those steps
        out = sched.schedule()
        ids = [s.seq.seq_id for s in out.scheduled]
        assert ids[0] == 0 and out.num_tokens <= 16
        sched.step_done(out)
        a.token_ids.append(9)
    assert 0 < b.num_computed < 100


def test_preempts_newest_and_requeues_first() -> None:
    kv = PagedKVCache(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_running=4, max_num_tokens=16)
    old, new = Sequence(0, [1] * 7, 7, arrival=0), Sequence(1, [2] * 7, 7, arrival=1)
    sched.add(old)
    sched.add(new)
    sched.step_done(sched.schedule())  # both prefilled: 2 blocks each, cache full
    old.token_ids += [5, 5]
    new.token_ids += [6, 6]
    old.num_computed = new.num_computed = 8  # pretend both decoded one token; each needs a 3rd block now
    out = sched.schedule()
    assert out.preempted == [new] and new.status == SeqStatus.WAITING and sched.waiting[0] is new
    assert [s.seq for s in out.scheduled] == [old]
    assert new.num_computed == 0 and new.num_preemptions == 1
