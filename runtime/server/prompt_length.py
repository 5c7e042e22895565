"""A cheap lower bound on the number of tokens of a text, to refuse a prompt that cannot fit the
context before the tokenizer runs (tokenizing costs time and ~80 bytes of memory per byte of text:
three 21 MB prompts took a server from 0.45 to 5.7 GB before the context check refused them).

The bound: when no token of the tokenizer covers more than ``L`` bytes of the original text, and the
tokenizer drops no byte of it, a text of ``b`` UTF-8 bytes has at least ``ceil(b / L)`` tokens.
:func:`length_bound` finds ``L`` from the tokenizer's own description (``tokenizer.json``), and only
where it can prove it; where it cannot (a step that may delete text, such as stripping whitespace,
or an unknown token that may swallow any run of characters) it returns None and no prompt is
refused early. The proof, step by step:

- the model's pieces match the normalized, pre-tokenized text: a piece covers at most its own UTF-8
  bytes of it (byte-fallback pieces ``<0xNN>`` and ``##`` continuations cover less), and with a
  ``ByteLevel`` pre-tokenizer, where every byte of the text became one character, at most as many
  bytes as it has characters;
- an unknown-token piece covers one character (4 bytes) unless unknown characters are fused into
  one token (``fuse_unk``) or dropped (no unknown token): then the bound holds only when every byte
  has a piece (byte fallback), or, with a ``ByteLevel`` pre-tokenizer and no normalizer, for the
  bytes that have one: the characters holding a byte without a piece are not counted (SmolLM2's
  vocabulary lacks six ASCII control characters and the lead bytes 0xF1 and 0xF2, which the
  tokenizer drops: ``"\x04" * 1000`` is no token at all);
- normalizers that only add or replace text by longer text (``Prepend``, ``Replace`` of a string by
  one at least as long) keep the bound; those that map characters to characters (``NFD``,
  ``NFKD``, ``Lowercase``: never fewer code points) shrink the bytes by at most 4 (a 4-byte code
  point may become a 1-byte one); ``NFC`` and ``NFKC`` compose at most 4 code points into one (no
  canonical decomposition is longer) and so shrink by at most 16; everything else (``Strip``,
  ``StripAccents``, ``BertNormalizer``, ``Precompiled``, ``Nmt``, regex replacements) may delete text
  without bound;
- pre-tokenizers that split without removing anything keep the bound; ``Whitespace``,
  ``WhitespaceSplit``, ``BertPreTokenizer``, ``CharDelimiterSplit`` and ``Removed`` splits delete text;
- added tokens match their content (before or after normalization, as each says), so they cover
  their content's bytes, unless they also swallow the whitespace beside them (``lstrip``/``rstrip``);
- a tokenizer that truncates changes the count itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llmc.compiler.tokenizer import LlmcTokenizer, byte_level_alphabet

UTF8_MAX = 4  # bytes of the longest UTF-8 character

# how many times fewer UTF-8 bytes a normalizer may leave (None: without bound)
_SHRINK_BY_TYPE = {"NFD": UTF8_MAX, "NFKD": UTF8_MAX, "Lowercase": UTF8_MAX, "NFC": 4 * UTF8_MAX,
                   "NFKC": 4 * UTF8_MAX, "Prepend": 1, "ByteLevel": 1}
_SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Punctuation", "Digits", "UnicodeScripts",
                             "FixedLength"}


def _normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        total = 1
        for step in spec.get("normalizers") or []:
            shrink = _normalizer_shrink(step)
            if shrink is None:
                return None
            total *= shrink
        return total
    if kind == "Replace":
        pattern, content = spec.get("pattern") or {}, spec.get("content")
        if "String" not in pattern or not isinstance(content, str) or not content:
            return None  # a regex may match any length; an empty replacement deletes
        pattern_bytes = len(str(pattern["String"]).encode())
        return max(1, -(-pattern_bytes // len(content.encode())))
    return _SHRINK_BY_TYPE.get(str(kind))


def _pre_tokenizer(spec: dict[str, Any] | None) -> tuple[bool, bool]:
    """(keeps every byte of the text, maps bytes to characters (``ByteLevel``))."""
    if spec is None:
        return True, False
    kind = spec.get("type")
    if kind == "Sequence":
        steps = [_pre_tokenizer(step) for step in spec.get("pretokenizers") or []]
        return all(keeps for keeps, _ in steps), any(byte_level for _, byte_level in steps)
    if kind not in _SPLITTING_PRE_TOKENIZERS or spec.get("behavior") in ("Removed", "removed"):
        return False, False
    return True, kind == "ByteLevel"


def _byte_level_bytes() -> dict[str, int]:
    """The ``ByteLevel`` pre-tokenizer's character for each byte, to that byte (GPT-2's table)."""
    return {c: b for b, c in byte_level_alphabet().items()}


def _dropped_characters(missing: set[int]) -> tuple[re.Pattern[str] | None, str]:
    """The characters of valid text whose UTF-8 holds one of the ``missing`` bytes, as a pattern (None: none)."""
    ranges: list[tuple[int, int]] = [(b, b) for b in missing if b < 0x80]
    if any(0x80 <= b < 0xC0 for b in missing):  # a continuation byte: any non-ASCII character may hold it
        ranges.append((0x80, 0x10FFFF))
    for b in missing:
        if 0xC2 <= b < 0xE0:
            ranges.append(((b - 0xC0) << 6, ((b - 0xC0) << 6) + 0x3F))
        elif 0xE0 <= b < 0xF0:
            ranges.append((max((b - 0xE0) << 12, 0x800), ((b - 0xE0) << 12) + 0xFFF))
        elif 0xF0 <= b < 0xF5:
            ranges.append((max((b - 0xF0) << 18, 0x10000), min(((b - 0xF0) << 18) + 0x3FFFF, 0x10FFFF)))
        # 0xC0, 0xC1 and 0xF5-0xFF never occur in UTF-8
    if not ranges:
        return None, ""
    pattern = re.compile("[" + "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in sorted(ranges)) + "]")
    return pattern, "".join(chr(b) for b in sorted(missing) if b < 0x80)


@dataclass(frozen=True)
class LengthBound:
    """No token covers more than ``bytes_per_token`` bytes of text, and only the characters that
    ``dropped`` matches (None: none; ``dropped_ascii``: those of them that are ASCII) may be left out
    of the tokens altogether."""

    bytes_per_token: int
    dropped: re.Pattern[str] | None = None
    dropped_ascii: str = ""

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of ``text`` (valid Unicode: check it first)."""
        return -(-self.counted_bytes(text) // self.bytes_per_token)

    def counted_bytes(self, text: str) -> int:
        """The UTF-8 bytes of ``text`` that tokens must cover (all but the ``dropped`` characters')."""
        if self.dropped is None:
            return utf8_length(text)
        if text.isascii():  # a count per character, without a copy
            return len(text) - sum(text.count(c) for c in self.dropped_ascii)
        return utf8_length(self.dropped.sub("", text))


def _model_bound(model: dict[str, Any], byte_level: bool, normalized: bool) -> LengthBound | None:
    """The most bytes of normalized text one of the model's tokens covers and what it drops, or None."""
    kind = model.get("type")
    if kind == "BPE":
        pieces = list((model.get("vocab") or {}).keys())
    elif kind == "Unigram":
        pieces = [str(entry[0]) for entry in model.get("vocab") or []]
    else:
        return None  # WordPiece and WordLevel map a whole word (any length) to their unknown token
    if not pieces:
        return None
    vocab = set(pieces)
    dropped: tuple[re.Pattern[str] | None, str] = (None, "")
    if byte_level:
        missing = {b for c, b in _byte_level_bytes().items() if c not in vocab}
        if missing and normalized:
            return None  # a normalizer may turn a counted character into a dropped one
        dropped = _dropped_characters(missing)  # with an unknown token, or fused ones, nothing more is lost
    elif not (bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        unknown = model.get("unk_token") if kind == "BPE" else model.get("unk_id")
        fused = bool(model.get("fuse_unk")) if kind == "BPE" else True  # Unigram always fuses unknowns
        if unknown is None or fused:
            return None  # characters without a piece are dropped, or any run of them is one token
    longest = max(len(p) if byte_level else len(p.encode()) for p in pieces)
    return LengthBound(max(longest, UTF8_MAX), *dropped)


def length_bound(tokenizer: LlmcTokenizer) -> LengthBound | None:
    """How few tokens a text of ``tokenizer`` can have, or None when no bound is sound."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    if spec.get("truncation") is not None:
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    keeps, byte_level = _pre_tokenizer(spec.get("pre_tokenizer"))
    model = _model_bound(spec.get("model") or {}, byte_level, spec.get("normalizer") is not None)
    if shrink is None or not keeps or model is None:
        return None
    longest = shrink * model.bytes_per_token
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):
            return None
        content_bytes = len(str(added.get("content", "")).encode())
        longest = max(longest, content_bytes * (shrink if added.get("normalized") else 1))
    return LengthBound(longest, model.dropped, model.dropped_ascii)


def utf8_length(text: str) -> int:
    """UTF-8 bytes of ``text`` (valid Unicode: check it first), without copying ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
