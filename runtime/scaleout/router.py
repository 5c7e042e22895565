"""Which engine replica takes a request: least outstanding requests, with prefix affinity.

A Ray Serve request router (``ray.serve.request_router.RequestRouter``, Ray 2.60) runs inside
each process that holds a handle to the engine deployment (the ingress). For every request it
returns ranks of candidates; Serve sends the request to the replica with the fewest ongoing
requests in the first rank that has room (queue lengths come from Serve's cache or a probe).

- Prefix affinity: the router remembers which replica each prompt-prefix hash
  (:func:`~llmc.runtime.scaleout.wire.prefix_hashes`) was last sent to. A request whose prompt
  shares at least ``min_prefix_tokens`` leading tokens with an earlier one ranks that replica
  first (the longest shared prefix wins), because its engine holds those blocks in its prefix
  cache; unless that replica is overloaded: full, or more than ``imbalance`` ongoing requests
  above the least loaded candidate.
- Otherwise (and as the fallback rank) every candidate, in random order: Serve picks the one with
  the least outstanding requests, ties broken at random.
- ``RoutingInfo.avoid`` names replicas not to use (a retry after a replica died), unless no other
  replica is left.

The memory is bounded (``max_entries`` hashes, least recently routed evicted first) and local to
one ingress process; a replica that is gone is never chosen (only live candidates are matched).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from llmc.runtime.scaleout.wire import (
    DEFAULT_IMBALANCE,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MIN_PREFIX_TOKENS,
    PREFIX_BLOCK_TOKENS,
    RoutingInfo,
)


def _routing(pending: PendingRequest | None) -> RoutingInfo | None:
    if pending is None:
        return None
    info = pending.kwargs.get("routing")
    return info if isinstance(info, RoutingInfo) else None


class PrefixAffinityRouter(RequestRouter):
    """Least outstanding requests with prefix affinity (see the module docstring)."""

    def initialize_state(self, min_prefix_tokens: int = DEFAULT_MIN_PREFIX_TOKENS, imbalance: int = DEFAULT_IMBALANCE,
                         max_entries: int = DEFAULT_MAX_ENTRIES, **_: Any) -> None:
        self.min_blocks = max(1, -(-int(min_prefix_tokens) // PREFIX_BLOCK_TOKENS))
        self.imbalance = int(imbalance)
        self.max_entries = int(max_entries)
        self._owner: OrderedDict[int, str] = OrderedDict()  # prefix hash -> replica unique id

    def _state(self) -> None:
        if not hasattr(self, "_owner"):  # Serve calls initialize_state; this keeps a bare instance usable
            self.initialize_state()

    def _queue_len(self, replica: RunningReplica) -> int:
        n = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if n is None else int(n)

    def preferred(self, hashes: list[int], candidates: list[RunningReplica]) -> RunningReplica | None:
        """The live candidate that was sent the longest prefix of ``hashes`` (at least ``min_blocks``)."""
        self._state()
        by_id = {r.replica_id.unique_id: r for r in candidates}
        for k in range(len(hashes) - 1, self.min_blocks - 2, -1):
            owner = self._owner.get(hashes[k])
            if owner is not None and owner in by_id:
                return by_id[owner]
        return None

    def overloaded(self, replica: RunningReplica, candidates: list[RunningReplica]) -> bool:
        mine = self._queue_len(replica)
        least = min(self._queue_len(r) for r in candidates)
        return mine >= replica.max_ongoing_requests or mine - least > self.imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._state()
        info = _routing(pending_request)
        candidates = list(candidate_replicas)
        if info is not None and info.avoid:
            others = [r for r in candidates if r.replica_id.unique_id not in info.avoid]
            candidates = others or candidates
        if not candidates:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between rounds when all are full
        ranks: list[list[RunningReplica]] = []
        if info is not None and len(info.prefix_hashes) >= self.min_blocks:
            best = self.preferred(info.prefix_hashes, candidates)
            if best is not None and not self.overloaded(best, candidates):
                ranks.append([best])
        ranks.append(random.sample(candidates, len(candidates)))
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        self._state()
        info = _routing(pending_request)
        if info is None:
            return
        info.replica = replica_id.unique_id
        for h in info.prefix_hashes:
            self._owner[h] = replica_id.unique_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
