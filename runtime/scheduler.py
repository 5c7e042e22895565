"""The iteration-level scheduler: which tokens of which sequences run in the next step.

There are no prefill and decode phases. Every sequence knows its tokens (prompt plus what it
generated) and how many of them are computed (in the KV cache); a step computes some more of
them, under a token budget (``max_num_tokens``). Each step:

1. **Running decodes first**: every running sequence with one token left gets it scheduled,
   oldest first, so a long new prompt never stalls running streams.
2. **Running prefills next**: sequences still prefilling get the next chunk of their prompt
   that fits in what is left of the budget (chunked prefill).
3. **Admission**: waiting sequences, first come first served, while fewer than
   ``max_running`` run and budget is left, if the KV cache can hold their known tokens
   (prefix-cache hits count as already computed).

When a running sequence cannot grow because the cache is full, the newest running sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed (as a prefill of prompt + output so far) when there is room. Nothing ever fails
for lack of cache memory; a request that could not fit even alone is refused up front by the
engine. Pure Python: tested with a fake executor.

**Tokens in flight.** When the engine runs the next step before the previous one's samples
reach the host (an executor whose ``launch`` returns early, :mod:`llmc.runtime.executor`), a
sequence sampled by the step in flight has ``num_pending = 1``: a token the device knows and the
host does not. It counts as a known token (the next step feeds it, deferred), except for prefix
registration, which waits until the host has it. A sequence whose pending token is its last
(``max_len`` reached) is not scheduled again: it finishes when that token arrives.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from llmc.compiler.errors import LlmcError
from llmc.runtime.kv_cache import KVCacheManager


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and progress. ``arrival`` orders sequences (older = smaller)."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    arrival: int
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    num_pending: int = 0
    """Tokens sampled by a step in flight that the host has not received yet (0 or 1)."""
    max_len: int | None = None
    """The most tokens (prompt + outputs) the sequence can reach; None: unbounded."""
    cache_limit: int | None = None
    """At most this many leading tokens may come from prefix-cache hits (None: no limit): a
    request that wants the logits of its prompt rows (prompt logprobs) must compute them."""

    @property
    def num_tokens(self) -> int:
        """Known tokens: on the host, plus the pending one."""
        return len(self.token_ids) + self.num_pending

    @property
    def complete(self) -> bool:
        """Whether every token it may have is known (the last one possibly still pending)."""
        return self.max_len is not None and self.num_tokens >= self.max_len

    @property
    def num_remaining(self) -> int:
        """Known tokens not yet in the cache (1 while decoding)."""
        return self.num_tokens - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class ScheduledSeq:
    """``num_new`` tokens of ``seq`` from position ``start``; ``sample`` when they reach its end."""

    seq: Sequence
    start: int
    num_new: int

    @property
    def sample(self) -> bool:
        return self.start + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    """Token-budget scheduler with decode-first fairness, admission control and preemption."""

    def __init__(self, kv: KVCacheManager, max_running: int, max_num_tokens: int) -> None:
        if max_running < 1:
            raise LlmcError(f"max_running must be at least 1, got {max_running}")
        if max_num_tokens < max_running:
            raise LlmcError(f"max_num_tokens ({max_num_tokens}) must be at least max_running ({max_running}) "
                            "so that every running sequence can decode in each step")
        self.kv = kv
        self.max_running = max_running
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` (finished or cancelled, running or waiting) and free its blocks."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
        elif seq.status == SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def step_done(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens computed (call after the executor ran ``out``)."""
        for s in out.scheduled:
            s.seq.num_computed = s.start + s.num_new
            # a pending token is computed but not known here: its block is registered on a later commit
            self.kv.commit(s.seq.seq_id, s.seq.token_ids, min(s.seq.num_computed, len(s.seq.token_ids)))

    # -- scheduling -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        decodes = [s for s in self.running if s.num_remaining == 1]
        prefills = [s for s in self.running if s.num_remaining > 1]
        for seq in decodes + prefills:
            if seq.status != SeqStatus.RUNNING or seq.complete:
                continue  # preempted earlier in this step, or only waiting for its last token
            n = min(seq.num_remaining, budget)
            if n <= 0:
                break
            if self._make_room(seq, seq.num_computed + n, out):
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            budget = self.max_num_tokens - out.num_tokens
        if not out.preempted:
            self._admit(out)
        return out

    def _admit(self, out: SchedulerOutput) -> None:
        budget = self.max_num_tokens - out.num_tokens
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted while a token was in flight: it resumes once that arrives
                break
            cached = self.kv.admit(seq.seq_id, seq.token_ids, seq.cache_limit)
            if cached is None:
                break
            seq.num_computed = cached
            n = min(seq.num_remaining, budget)
            if not self.kv.ensure(seq.seq_id, seq.num_computed + n):
                self.kv.free(seq.seq_id)
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Grow ``seq`` to ``num_tokens``, preempting the newest running sequences as needed."""
        while not self.kv.ensure(seq.seq_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.preempted.append(seq)
        self.waiting.appendleft(seq)  # victims are taken newest first, so older ones end up in front
