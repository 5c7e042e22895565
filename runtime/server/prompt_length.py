"""A cheap lower bound on the number of tokens of a text, to refuse a prompt that cannot fit the
context before the tokenizer runs (tokenizing costs time and ~80 bytes of memory per byte of text:
three 21 MB prompts took a server from 0.45 to 5.7 GB before the context check refused them).

The bound: when no token of the tokenizer covers more than ``L`` bytes of the original text, a text
of ``b`` UTF-8 bytes has at least ``ceil(b / L)`` tokens. :func:`max_bytes_per_token` finds ``L``
from the tokenizer's own description (``tokenizer.json``), and only where it can prove it; where it
cannot (a step that may delete text, such as stripping whitespace, or an unknown token that may
swallow any run of characters) it returns None and no prompt is refused early. The proof, step by step:

- the model's pieces match the normalized, pre-tokenized text: a piece covers at most its own UTF-8
  bytes of it (byte-fallback pieces ``<0xNN>`` and ``##`` continuations cover less), and with a
  ``ByteLevel`` pre-tokenizer, where every byte of the text became one character, at most as many
  bytes as it has characters;
- an unknown-token piece covers one character (4 bytes) unless unknown characters are fused into
  one token (``fuse_unk``) or dropped (no unknown token): then the bound holds only when every byte
  has a piece (byte-level alphabets, byte fallback);
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
from typing import Any

from llmc.compiler.tokenizer import LlmcTokenizer

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


def _byte_level_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


def _model_piece_bytes(model: dict[str, Any], byte_level: bool) -> int | None:
    """The most bytes of normalized text one of the model's tokens covers, or None."""
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
    if byte_level:
        every_byte = _byte_level_alphabet() <= vocab
    else:
        every_byte = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))
    if not every_byte:
        unknown = model.get("unk_token") if kind == "BPE" else model.get("unk_id")
        fused = bool(model.get("fuse_unk")) if kind == "BPE" else True  # Unigram always fuses unknowns
        if unknown is None or fused:
            return None  # characters without a piece are dropped, or any run of them is one token
    longest = max(len(p) if byte_level else len(p.encode()) for p in pieces)
    return max(longest, UTF8_MAX)


def max_bytes_per_token(tokenizer: LlmcTokenizer) -> int | None:
    """The most bytes of text one token of ``tokenizer`` can cover, or None when no bound is sound."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    if spec.get("truncation") is not None:
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    keeps, byte_level = _pre_tokenizer(spec.get("pre_tokenizer"))
    piece_bytes = _model_piece_bytes(spec.get("model") or {}, byte_level)
    if shrink is None or not keeps or piece_bytes is None:
        return None
    longest = shrink * piece_bytes
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip"):
            return None
        content_bytes = len(str(added.get("content", "")).encode())
        longest = max(longest, content_bytes * (shrink if added.get("normalized") else 1))
    return longest


def utf8_length(text: str) -> int:
    """UTF-8 bytes of ``text`` (valid Unicode: check it first), without copying ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def min_tokens(text: str, bytes_per_token: int) -> int:
    """A lower bound on the tokens of ``text`` when no token covers more than ``bytes_per_token`` bytes."""
    return -(-utf8_length(text) // bytes_per_token)
