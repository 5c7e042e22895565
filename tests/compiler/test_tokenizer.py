"""Tokenizers from tokenizer.json, and chat templates rendered like Hugging Face does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmc.compiler.frontends.source import load_source
from llmc.errors import LlmcError
from tests.models import write_byte_level_tokenizer, write_random_hf_model


@pytest.fixture(scope="module")
def model_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_hf_model(tmp_path_factory.mktemp("m300"), seed=5, vocab_size=300, eos_token_id=2)


@pytest.fixture
def folder(model_300: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_300, dst)
    return write_byte_level_tokenizer(dst, 300)


def test_encode_decode_and_chat(folder: Path) -> None:
    tok = load_source(folder).tokenizer
    assert tok is not None
    ids = tok.encode("héllo wörld")
    assert ids[0] == 0
    assert tok.decode(ids) == "héllo wörld"
    assert 2 in tok.meta.eos_token_ids
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_survives_the_artifact(folder: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.generate import generate_ids
    from llmc.runtime.loader import load_model
    from llmc.runtime.sampling import SamplingParams

    art = compile_model(folder, tmp_path / "art", CompileOptions(opt_level=0))
    model = load_model(str(art))
    source_tok = load_source(folder).tokenizer
    assert model.tokenizer is not None and source_tok is not None
    assert model.tokenizer.encode("abc déf") == source_tok.encode("abc déf")
    assert model.tokenizer.meta == source_tok.meta
    result = generate_ids(model, model.tokenizer.encode("hello"), SamplingParams(max_tokens=5, temperature=0))
    assert len(result.token_ids) >= 1


def test_missing_template_is_a_clear_error(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text("{}")
    tok = load_source(folder).tokenizer
    assert tok is not None
    with pytest.raises(LlmcError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
