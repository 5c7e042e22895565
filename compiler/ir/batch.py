"""What the ``kvcache`` operand means: the layout of one step's batch of sequences.

A step runs the flattened new tokens of several sequences. Sequence ``j`` contributes
``query_lens[j]`` consecutive tokens; after the step it holds ``context_lens[j]`` tokens in
the cache, so its new tokens sit at positions ``context_lens[j] - query_lens[j]`` onwards
and query ``i`` of it attends to cached positions ``0 .. past + i`` (causal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """Sequences of one step, in the order their tokens are flattened."""

    seq_ids: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.seq_ids)
        if len(self.query_lens) != n or len(self.context_lens) != n:
            raise ValueError("seq_ids, query_lens and context_lens differ in length")
        if len(set(self.seq_ids)) != n:
            raise ValueError("a sequence appears twice in one step")
        for q, c in zip(self.query_lens, self.context_lens, strict=True):
            if q <= 0 or c < q:
                raise ValueError(f"bad segment: {q} new tokens, context {c}")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def past_len(self, j: int) -> int:
        return self.context_lens[j] - self.query_lens[j]

    def starts(self) -> list[int]:
        out, acc = [], 0
        for q in self.query_lens:
            out.append(acc)
            acc += q
        return out

    def positions(self) -> list[int]:
        """The position of every flattened token."""
        pos: list[int] = []
        for j, q in enumerate(self.query_lens):
            past = self.past_len(j)
            pos.extend(range(past, past + q))
        return pos

    def last_token_rows(self) -> list[int]:
        """Row of each sequence's last new token in the flattened batch."""
        return [s + q - 1 for s, q in zip(self.starts(), self.query_lens, strict=True)]
