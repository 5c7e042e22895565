"""What the ingress and the engine replicas send each other (pickled by Ray): the items of a
replica's ``generate`` stream, the routing hints a request carries, and the prompt-prefix hashes
that prefix affinity keys on.

A replica's stream is one :class:`Admitted` (the engine took the sequences) or one
:class:`Refused` (the engine's typed refusal, rebuilt at the ingress so that the HTTP layer maps it
exactly as the single-process server does), then lists of ``(choice index, Delta)``, and a
:class:`Failed` if a sequence failed on the replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.errors import LlmcError, RequestError
from llmc.runtime.errors import (
    ContextLengthError,
    EmptyPromptError,
    EngineClosedError,
    KVCacheTooSmallError,
    QueueFullError,
    TokenIdError,
)
from llmc.runtime.structured import GrammarError

PREFIX_BLOCK_TOKENS = 16
"""Prompt tokens per prefix hash: requests whose prompts share ``k`` whole blocks share ``k`` hashes."""

MAX_PREFIX_BLOCKS = 512
"""At most this many leading blocks are hashed (8192 tokens): longer shared prefixes count as that long."""

REPLICA_HEADER = "x-llmc-replica"

DEFAULT_MIN_PREFIX_TOKENS = 64
"""Prefix affinity applies to prompts sharing at least this many leading tokens with an earlier one."""
DEFAULT_IMBALANCE = 8
"""The replica holding a prefix is overloaded when it has more ongoing requests than the least loaded by this."""
DEFAULT_MAX_ENTRIES = 1 << 18
"""Prefix hashes the router remembers (least recently routed forgotten first)."""


@dataclass
class Admitted:
    """The replica's engine took every sequence of the request."""

    replica: str


@dataclass
class Refused:
    """The replica's engine refused the request (a typed :class:`RequestError` or a closed engine)."""

    replica: str
    kind: str
    message: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failed:
    """A sequence failed on the replica after it was admitted (the step raised)."""

    replica: str
    message: str


@dataclass
class RoutingInfo:
    """Hints for :class:`~llmc.runtime.scaleout.router.PrefixAffinityRouter`, passed as the
    ``routing`` keyword of a replica call. The router writes ``replica``, the id it picked."""

    prefix_hashes: list[int] = field(default_factory=list)
    avoid: list[str] = field(default_factory=list)
    replica: str | None = None


_REFUSALS: dict[str, type[LlmcError]] = {cls.__name__: cls for cls in (
    EmptyPromptError, TokenIdError, ContextLengthError, KVCacheTooSmallError, QueueFullError, EngineClosedError,
    GrammarError)}


def refused(replica: str, exc: LlmcError) -> Refused:
    """The refusal ``exc`` as a message (the typed errors take their numbers as constructor
    arguments, so they do not pickle; their attributes travel instead)."""
    kind = type(exc).__name__ if type(exc).__name__ in _REFUSALS else "RequestError"
    return Refused(replica, kind, str(exc), dict(vars(exc)))


def refusal_error(item: Refused) -> LlmcError:
    """The typed error a :class:`Refused` carries, as the engine raised it."""
    cls = _REFUSALS.get(item.kind, RequestError)
    exc = cls.__new__(cls)
    Exception.__init__(exc, item.message)
    exc.__dict__.update(item.attrs)
    return exc


def prefix_hashes(ids: list[int], block: int = PREFIX_BLOCK_TOKENS, max_blocks: int = MAX_PREFIX_BLOCKS) -> list[int]:
    """Chained hashes of the whole ``block``-token blocks of ``ids``: ``hashes[k]`` stands for
    ``ids[: (k + 1) * block]``, so two prompts share their first ``k`` hashes exactly when they
    share their first ``k`` blocks (the same chaining as the engine's prefix cache). Integer
    tuples hash the same in every process (no hash randomization for ints)."""
    out: list[int] = []
    h = 0
    for k in range(min(len(ids) // block, max_blocks)):
        h = hash((h, *ids[k * block:(k + 1) * block]))
        out.append(h)
    return out
