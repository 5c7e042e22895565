"""The server's stream chunks: the template-made text events are the bytes the general builder makes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime.server.formatting import Formatter, sse
from llmc.runtime.server.generation import Delta
from llmc.runtime.server.tokens import TokenBytes
from tests.models import byte_level_tokenizer

TEXTS = ["a", " hello", 'quote " and \\ back', "new\nline\ttab", "\x00\x1f control", "é ü 漢字 🙂",
         "\x00llmc-text\x00", ""]


@pytest.fixture
def formatter() -> Formatter:
    tokenizer = LlmcTokenizer(byte_level_tokenizer(99, printable_only=True), TokenizerMeta(bos_token_id=0))
    return Formatter("cmpl-\x00llmc-text\x00\"id", 'model "\x00llmc-text\x00" é', TokenBytes(tokenizer))


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("index", [0, 3])
def test_text_events_are_the_general_chunks_bytes(formatter: Formatter, include_usage: bool, index: int) -> None:
    for text in TEXTS:
        completion = sse(formatter.completion_chunk(index, Delta(text, [5]), None, 0, include_usage=include_usage))
        assert formatter.text_event(index, text, chat=False, include_usage=include_usage) == completion
        chat = sse(formatter.chat_chunk(index, {"content": text}, include_usage=include_usage))
        assert formatter.text_event(index, text, chat=True, include_usage=include_usage) == chat
        body = json.loads(chat[len(b"data: "):])
        assert body["choices"][0]["delta"]["content"] == text and body["model"] == formatter.model
