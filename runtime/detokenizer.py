"""Incremental detokenization for streaming, with stop strings.

Decoding token by token is not the same as decoding each token alone: byte-fallback tokens
form one character only together, and SentencePiece decoders drop a leading space only at
the start of a text. :class:`IncrementalDetokenizer` decodes a short sliding window (it starts
with the last prompt tokens as context) and emits the difference, which

- never ends in a broken character: a window decoding to U+FFFD at its end (an incomplete
  UTF-8 sequence) waits for the next token;
- never contains a stop string: each stop string is searched in the whole output text, across
  token boundaries, and the output is cut before the first match;
- never emits text that could be the start of a stop string: the longest suffix of the text
  that is a prefix of some stop string is held back until it is decided.

The concatenation of everything emitted (``add`` calls, then ``flush``) is the output text.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class IncrementalDetokenizer:
    """Turns one request's generated tokens into text deltas."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True, context: int = 5) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stops = list(stop or [])
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = list(prompt_ids[-context:]) if context > 0 else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output text (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` already returned
        self.stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            before = len(self.text)
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stops and self._find_stop(max(0, before - self.max_stop + 1)):
                return self._take(len(self.text))
        limit = len(self.text) - held_back(self.text, self.stops) if self.stops else len(self.text)
        return self._take(limit)

    def flush(self) -> str:
        """The rest of the text at the end of generation (held-back and incomplete parts too)."""
        if not self.stopped:
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            new_text = self._decode(self.ids[self.prefix_offset :])
            if len(new_text) > len(prefix_text):
                self.text += new_text[len(prefix_text) :]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._take(len(self.text))

    def _find_stop(self, start: int) -> bool:
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:index]
        self.stop_string = stop
        return True

    def _take(self, limit: int) -> str:
        if limit <= self.emitted:
            return ""
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out
