"""The exact bytes and display text of single tokens (for OpenAI logprobs)."""

from __future__ import annotations

import json
import re
from functools import lru_cache

from llmc.compiler.tokenizer import LlmcTokenizer, byte_level_alphabet

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted (what byte-level BPE pieces are spelled with)."""
    return {c: b for b, c in byte_level_alphabet().items()}


def _uses_byte_level(tokenizer: LlmcTokenizer) -> bool:
    decoder = json.loads(tokenizer.tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class TokenBytes:
    """Maps token ids to their bytes: byte-level BPE pieces, ``<0xNN>`` byte pieces,
    SentencePiece ``▁`` pieces and added (special) tokens."""

    def __init__(self, tokenizer: LlmcTokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _uses_byte_level(tokenizer)
        self.added = {i: t.content for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def text_of(self, token_id: int) -> str:
        """The token as text; bytes that are not whole UTF-8 characters appear as ``\\xNN``."""
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")

    def _compute(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self.byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return piece.replace("\u2581", " ").encode()
