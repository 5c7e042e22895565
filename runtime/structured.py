"""Constrained decoding: a :class:`Constraint` (JSON object, JSON Schema, regex or grammar) limits
the tokens a request may sample, through a vocabulary mask computed by llguidance.

Why llguidance (``benchmarks/grammar_engines.py``, figures in docs/performance.md): on SmolLM2's
49,152-token vocabulary it compiles a JSON Schema in under a millisecond (xgrammar ~19 ms,
outlines-core ~420 ms), computes a mask in ~24 us per token on average (xgrammar ~4 us,
outlines-core ~110 us): far below a decode step either way; it covers every JSON Schema feature
of the benchmark's list (xgrammar accepts invalid ``allOf`` instances; outlines-core has no
context-free grammars and loose numeric bounds), takes Lark grammars and llama.cpp's GBNF, and it
is one dependency-free wheel (xgrammar pulls triton and transformers).

The pieces, used by the engine's step loop:

- :class:`Constraint` (what ``SamplingParams(constraint=...)`` holds: declarative, shareable);
- :class:`GrammarCompiler` (one per engine: the tokenizer's llguidance view; checks a constraint at
  submission, raising :class:`GrammarError`, and makes a fresh :class:`ConstraintMatcher` per request);
- :func:`compute_masks` (the masks of one step's constrained rows, in one call that releases the
  GIL, so it runs on a worker thread while the executor's forward pass runs);
- :class:`TokenMask` (packed bitmask rows; :meth:`TokenMask.apply` sets disallowed logits to -inf).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llmc.compiler.errors import RequestError
from llmc.compiler.tokenizer import LlmcTokenizer

ConstraintKind = Literal["json_object", "json_schema", "regex", "grammar"]

JSON_LAYOUT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is laid out: ``json.dumps``' separators and no free whitespace, so a
sampled model cannot spend its tokens on spaces and newlines between values."""


class GrammarError(RequestError):
    """A constraint that cannot be compiled (a bad JSON Schema, regex or grammar); ``field`` names
    where it came from (``response_format``, ``guided_regex``, ...), when known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Constraint:
    """What the output must match. Build one with :meth:`json_object`, :meth:`json_schema`,
    :meth:`regex` or :meth:`grammar` (Lark, as llguidance reads it, or llama.cpp GBNF).

    ``spec`` is the schema as JSON text, the regex or the grammar; ``field`` names the request
    field it came from (for error messages)."""

    kind: ConstraintKind
    spec: str = ""
    field: str | None = None

    @classmethod
    def json_object(cls, field: str | None = None) -> Constraint:
        """Any JSON object."""
        return cls("json_object", "", field)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, field: str | None = None) -> Constraint:
        """JSON that validates against ``schema`` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"the JSON Schema is not valid JSON: {exc}", field) from exc
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON Schema must be an object, got {type(schema).__name__}", field)
        return cls("json_schema", json.dumps(schema), field)

    @classmethod
    def regex(cls, pattern: str, field: str | None = None) -> Constraint:
        """Text that matches ``pattern`` as a whole (Rust regex syntax)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("the regex must be a non-empty string", field)
        return cls("regex", pattern, field)

    @classmethod
    def grammar(cls, grammar: str, field: str | None = None) -> Constraint:
        """Text of a context-free grammar: Lark (llguidance's dialect, ``start`` rule) or GBNF (``root ::= ...``)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("the grammar must be a non-empty string", field)
        return cls("grammar", grammar, field)

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar definition."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        if self.kind == "json_object":
            return str(LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT))
        if self.kind == "json_schema":
            return str(LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_LAYOUT))
        if self.kind == "regex":
            return str(LLMatcher.grammar_from_regex(self.spec))
        try:
            lark = any_to_lark(self.spec)
        except Exception as exc:
            raise GrammarError(f"the grammar is neither Lark nor GBNF: {exc}", self.field) from exc
        return str(LLMatcher.grammar_from_lark(lark))


class ConstraintMatcher:
    """One request's position in its constraint (an llguidance ``LLMatcher``)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the constraint did not allow it."""
        return bool(self.matcher.consume_token(int(token))) and not self.matcher.is_error()

    @property
    def finished(self) -> bool:
        """The constraint is complete (nothing but the end may follow) or broken."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self.matcher.get_error()) if self.matcher.is_error() else None


class GrammarCompiler:
    """Compiles constraints for one model's tokenizer and vocabulary (thread-safe)."""

    CACHE_SIZE = 64

    def __init__(self, tokenizer: LlmcTokenizer, vocab_size: int, eos_ids: set[int]) -> None:
        try:
            import llguidance
        except ImportError as exc:  # pragma: no cover - llguidance is a core dependency
            raise RequestError("constrained decoding needs llguidance: pip install llguidance") from exc
        self._llg = llguidance
        eos = sorted(eos_ids) or None
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _template(self, constraint: Constraint) -> Any:
        with self._lock:
            matcher = self._compiled.get(constraint)
            if matcher is not None:
                self._compiled.move_to_end(constraint)
                return matcher
        try:
            grammar = constraint.llguidance_grammar()
        except GrammarError:
            raise
        except Exception as exc:  # llguidance raises ValueError on a schema that is not JSON
            raise GrammarError(self._message(constraint, str(exc)), constraint.field) from exc
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(self._message(constraint, matcher.get_error()), constraint.field)
        with self._lock:
            self._compiled[constraint] = matcher
            while len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    @staticmethod
    def _message(constraint: Constraint, error: str) -> str:
        what = {"json_object": "JSON object", "json_schema": "JSON Schema", "regex": "regex",
                "grammar": "grammar"}[constraint.kind]
        where = f" ({constraint.field})" if constraint.field else ""
        return f"invalid {what}{where}: {error.strip()}"

    def check(self, constraint: Constraint) -> None:
        """Compile ``constraint`` (kept for the requests that use it); raises :class:`GrammarError`."""
        self._template(constraint)

    def matcher(self, constraint: Constraint) -> ConstraintMatcher:
        """A fresh matcher at the start of ``constraint``; raises :class:`GrammarError`."""
        return ConstraintMatcher(self._template(constraint).deep_copy())


@dataclass
class TokenMask:
    """Allowed tokens of some rows of a batch: ``bits[i]`` (packed, 32 tokens per int32, little
    endian bit order) is the mask of batch row ``rows[i]``."""

    rows: list[int]
    bits: np.ndarray

    def allowed(self, vocab: int) -> np.ndarray:
        """Boolean ``[len(rows), vocab]``."""
        return np.unpackbits(self.bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)

    def apply(self, logits: np.ndarray) -> None:
        """Set the disallowed logits of the masked rows to -inf, in place."""
        if not self.rows:
            return
        rows = np.asarray(self.rows)
        logits[rows] = np.where(self.allowed(logits.shape[1]), logits[rows], -np.inf)


_EXECUTOR: Any = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> Any:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            import llguidance

            _EXECUTOR = llguidance.LLExecutor()
        return _EXECUTOR


def compute_masks(rows: list[tuple[int, ConstraintMatcher]], vocab_size: int) -> TokenMask:
    """The next-token masks of ``(batch row, matcher)`` pairs, computed in parallel by llguidance
    (the GIL is released meanwhile: run it on a worker thread beside the forward pass)."""
    words = (vocab_size + 31) // 32
    bits = np.zeros((len(rows), words), dtype=np.int32)
    if rows:
        from llguidance.numpy import fill_next_token_bitmask_par

        fill_next_token_bitmask_par(_executor(), [(m.matcher, i) for i, (_, m) in enumerate(rows)], bits)
    return TokenMask([r for r, _ in rows], bits)
