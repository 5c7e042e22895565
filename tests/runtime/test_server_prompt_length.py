"""The lower bound on a text's token count that lets the server refuse a long prompt before
tokenizing it (runtime/server/prompt_length.py): never above the true count, for every tokenizer
it claims a bound for; no bound where a tokenizer may delete text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.server.prompt_length import LengthBound, length_bound
from tests.models import SHARED, byte_level_tokenizer

STORIES_GGUF = SHARED / "models" / "stories260k" / "stories260k-f32.gguf"
LLAMA_SPM_GGUF = SHARED / "models" / "tokenizers" / "llama2-spm" / "ggml-vocab-llama-spm.gguf"

# text a hostile client might send: ASCII words, control characters (some vocabularies lack them),
# accents, CJK, emoji, characters of the supplementary planes (SmolLM2 lacks the lead bytes F1, F2)
_ALPHABET = st.sampled_from(["a", "b", " ", "the ", "\n", "\x04", "\x00", "\x1d", "é", "ß", "中", "😀",
                             chr(0x40000), chr(0x80001), chr(0x10FFFF), "<|im_end|>", "<s>", "\t", "1"])
TEXTS = st.lists(_ALPHABET, max_size=60).map("".join) | st.text(
    alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)


def _gguf_tokenizer(path: Path) -> LlmcTokenizer:
    from llmc.compiler.frontends.source import load_source

    if not path.exists():
        pytest.skip(f"{path} is not here (../shared)")
    tokenizer = load_source(path).tokenizer
    assert tokenizer is not None
    return tokenizer


def _wrap(tok: Tokenizer) -> LlmcTokenizer:
    return LlmcTokenizer(tok, TokenizerMeta())


@pytest.fixture(scope="module", params=["byte_level_full", "byte_level_printable", "stories260k", "llama_spm",
                                        "smollm2"])
def bounded(request: pytest.FixtureRequest) -> tuple[LlmcTokenizer, LengthBound]:
    name = request.param
    if name == "byte_level_full":
        tokenizer = _wrap(byte_level_tokenizer(300))
    elif name == "byte_level_printable":
        tokenizer = _wrap(byte_level_tokenizer(99, printable_only=True))
    elif name == "stories260k":
        tokenizer = _gguf_tokenizer(STORIES_GGUF)
    elif name == "llama_spm":
        tokenizer = _gguf_tokenizer(LLAMA_SPM_GGUF)
    else:
        tokenizer = _gguf_tokenizer(request.getfixturevalue("smollm2_gguf"))
    bound = length_bound(tokenizer)
    assert bound is not None, f"{name}: no bound (every prompt would be tokenized whole)"
    return tokenizer, bound


@given(text=TEXTS)
def test_the_bound_never_exceeds_the_token_count(bounded: tuple[LlmcTokenizer, LengthBound], text: str) -> None:
    tokenizer, bound = bounded
    for special in (True, False):
        assert bound.min_tokens(text) <= len(tokenizer.encode(text, add_special_tokens=special)), text


def test_the_bound_counts_what_a_vocabulary_drops(smollm2_gguf: Path) -> None:
    """SmolLM2's vocabulary has no piece for some control bytes and the lead bytes 0xF1/0xF2: the
    tokenizer drops those characters, so the bound must not count them."""
    tokenizer = _gguf_tokenizer(smollm2_gguf)
    bound = length_bound(tokenizer)
    assert bound is not None
    assert tokenizer.encode("\x04" * 1000) == [] and bound.min_tokens("\x04" * 1000) == 0
    assert bound.min_tokens(chr(0x40000) * 100) == 0
    words = "the quick brown fox " * 50_000  # 1 MB
    assert bound.min_tokens(words) >= len(words.encode()) // bound.bytes_per_token
    assert bound.min_tokens(words) <= len(tokenizer.encode(words))


def _bpe(**model: Any) -> Tokenizer:
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    return Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], **model))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _bpe(), id="bpe-drops-unknown-characters"),
    pytest.param(lambda: _bpe(unk_token="[UNK]", fuse_unk=True), id="bpe-fuses-unknown-runs"),
    pytest.param(lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), id="wordpiece"),
    pytest.param(lambda: Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), id="wordlevel"),
])
def test_no_bound_where_the_model_may_swallow_text(make: Any) -> None:
    assert length_bound(_wrap(make())) is None


def _byte_level_with(vocab_size: int = 300, printable_only: bool = False, **parts: Any) -> Tokenizer:
    tok = byte_level_tokenizer(vocab_size, printable_only)
    for name, value in parts.items():
        setattr(tok, name, value)
    return tok


@pytest.mark.parametrize("make", [
    pytest.param(lambda: _byte_level_with(normalizer=normalizers.Strip()), id="strip-normalizer"),
    pytest.param(lambda: _byte_level_with(normalizer=normalizers.BertNormalizer()), id="bert-normalizer"),
    pytest.param(lambda: _byte_level_with(pre_tokenizer=pre_tokenizers.Whitespace()), id="whitespace-split"),
    pytest.param(lambda: _byte_level_with(pre_tokenizer=pre_tokenizers.Split(" ", "removed")), id="removed-split"),
    pytest.param(lambda: _byte_level_with(normalizer=normalizers.NFKC(), vocab_size=99, printable_only=True),
                 id="normalizer-before-a-vocabulary-that-drops-bytes"),
])
def test_no_bound_where_a_step_may_delete_text(make: Any) -> None:
    assert length_bound(_wrap(make())) is None


def test_no_bound_with_truncation_or_stripping_added_tokens() -> None:
    tok = byte_level_tokenizer(300)
    tok.enable_truncation(16)
    assert length_bound(_wrap(tok)) is None
    tok = byte_level_tokenizer(300)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken("<sep>", lstrip=True)])
    assert length_bound(_wrap(tok)) is None


def test_normalizers_that_shrink_text_scale_the_bound() -> None:
    plain = length_bound(_wrap(byte_level_tokenizer(300)))
    nfkc = length_bound(_wrap(_byte_level_with(normalizer=normalizers.NFKC())))
    assert plain is not None and nfkc is not None
    assert nfkc.bytes_per_token == 16 * plain.bytes_per_token
    tokenizer = _wrap(_byte_level_with(normalizer=normalizers.NFKC()))
    for text in ("\ufb03" * 40, "\u2474" * 30, "ﾊﾟ" * 20, "e\u0301" * 30):  # ligatures, compositions
        assert nfkc.min_tokens(text) <= len(tokenizer.encode(text))
