"""Incremental detokenization: UTF-8 safety, stop strings across tokens, held-back prefixes."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.detokenizer import IncrementalDetokenizer, held_back

PIECES = ["▁Hello", "▁wor", "ld", "!", "▁the", "re", "ST", "OP", "▁"]


@pytest.fixture(scope="module")
def tok() -> LlmcTokenizer:
    """A SentencePiece-style vocab with byte fallback (decoding only)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({p: 259 + i for i, p in enumerate(PIECES)})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.add_special_tokens(["<s>", "</s>"])
    return LlmcTokenizer(t, TokenizerMeta(bos_token_id=1, eos_token_ids=[2]))


def ids(*items: str | int) -> list[int]:
    """Pieces by name, ints as raw bytes."""
    return [3 + i if isinstance(i, int) else 259 + PIECES.index(i) for i in items]


def run(tok: LlmcTokenizer, prompt: list[int], out: list[int], stop: list[str] | None = None
        ) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, prompt, stop)
    deltas = [d.add(t) for t in out]
    deltas.append(d.flush())
    return deltas, d


def test_multibyte_characters_are_never_split(tok: LlmcTokenizer) -> None:
    out = ids("▁Hello", 0xE6, 0x97, 0xA5, "▁wor", "ld", 0xF0, 0x9F, 0x99, 0x82, 0xC3, 0xA9)
    deltas, _ = run(tok, [1], out)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == deltas[2] == "" and deltas[3] == "日"
    assert deltas[6:9] == ["", "", ""] and deltas[9] == "🙂"
    assert "".join(deltas) == tok.decode(out) == "Hello日 world🙂é"


def test_prompt_context_keeps_the_leading_space(tok: LlmcTokenizer) -> None:
    assert "".join(run(tok, [1, *ids("▁Hello")], ids("▁wor", "ld"))[0]) == " world"
    assert "".join(run(tok, [1], ids("▁wor", "ld"))[0]) == "world"  # first piece after BOS: no space


def test_stop_string_across_token_boundaries(tok: LlmcTokenizer) -> None:
    out = ids("▁Hello", "▁wor", "ld", "!", "▁the", "re")
    deltas, d = run(tok, [1], out, stop=["world"])
    assert d.stopped and d.stop_string == "world"
    assert "".join(deltas) == "Hello "
    assert deltas[1] == " "  # "wor" is held back: it may start "world"
    assert deltas[3:] == ["", "", "", ""]


def test_stop_string_across_many_byte_tokens(tok: LlmcTokenizer) -> None:
    out = ids("▁Hello", 0xE6, 0x97, 0xA5, "!", "▁the")
    deltas, d = run(tok, [1], out, stop=["日!"])
    assert d.stopped and "".join(deltas) == "Hello"


def test_held_back_prefix_is_released_when_it_does_not_complete(tok: LlmcTokenizer) -> None:
    out = ids("▁Hello", "ST", "OP", "!")
    deltas, d = run(tok, [1], out, stop=["STOPX", "OPEN"])
    assert not d.stopped
    assert deltas[:3] == ["Hello", "", ""] and deltas[3] == "STOP!"
    assert "".join(deltas) == "HelloSTOP!"


def test_held_back_text_is_flushed_at_the_end(tok: LlmcTokenizer) -> None:
    deltas, d = run(tok, [1], ids("▁Hello", "ST"), stop=["STOP"])
    assert deltas == ["Hello", "", "ST"] and not d.stopped


def test_earliest_stop_string_wins(tok: LlmcTokenizer) -> None:
    deltas, d = run(tok, [1], ids("▁the", "re", "▁Hello", "!"), stop=["Hello", "here"])
    assert d.stop_string == "here" and "".join(deltas) == "t"


def test_held_back_helper() -> None:
    assert held_back("abc wor", ["world"]) == 3
    assert held_back("abc", ["world", "cx", "bcd"]) == 2
    assert held_back("abc", []) == 0
    assert held_back("world", ["world"]) == 0  # a whole match is not a prefix: it is found elsewhere
