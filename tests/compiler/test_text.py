"""Lone surrogates (text that is not valid Unicode) are found and named, in one line."""

from __future__ import annotations

import pytest

from llmc.compiler.errors import RequestError
from llmc.compiler.text import check_unicode, first_surrogate, not_unicode_message
from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from tests.models import byte_level_tokenizer


@pytest.mark.parametrize(("text", "index"), [
    ("", None), ("plain ascii", None), ("café 中文 😀", None), ("\ud800", 0), ("ab\udfff", 2),
    ("😀\udc80x", 1), ("\ud83d\ude00", 0),  # a surrogate pair in a str is two lone surrogates
])
def test_first_surrogate(text: str, index: int | None) -> None:
    assert first_surrogate(text) == index


def test_the_message_names_what_and_where() -> None:
    assert not_unicode_message("ab\ud800", 2, "the prompt") == (
        "the prompt is not valid Unicode: it holds a lone surrogate, U+D800, at character 2")
    # a byte that is not UTF-8, as Python decodes it from argv or a file (surrogateescape)
    assert not_unicode_message(b"a\xffb".decode("utf-8", "surrogateescape"), 1, "--prompt").endswith(
        "U+DCFF, at character 1 (the byte 0xFF, if it was read from bytes that are not UTF-8)")


def test_check_unicode_and_the_tokenizer() -> None:
    check_unicode("fine", "x")
    with pytest.raises(RequestError, match=r"^stop is not valid Unicode"):
        check_unicode("a\udc00", "stop")
    tokenizer = LlmcTokenizer(byte_level_tokenizer(300), TokenizerMeta())
    with pytest.raises(RequestError, match="the text is not valid Unicode"):
        tokenizer.encode("x\ud800")
    with pytest.raises(RequestError, match="text 1 is not valid Unicode"):
        tokenizer.encode_batch(["ok", "x\ud800"])
    assert tokenizer.encode_batch(["ok"]) == [tokenizer.encode("ok")]


def test_sampling_stop_strings() -> None:
    from llmc.runtime.sampling import SamplingParams

    with pytest.raises(RequestError, match="stop string 1 is not valid Unicode"):
        SamplingParams(stop=["ok", "\ud800"])
