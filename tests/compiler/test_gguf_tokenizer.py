"""Tokenizers built from GGUF metadata: llama.cpp's SPM golden vectors, SmolLM2's BPE, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFWriter

from llmc.cli import main
from llmc.compiler.config import ModelConfig
from llmc.compiler.frontends.gguf import load_gguf
from llmc.compiler.frontends.gguf_reader import Metadata, open_gguf
from llmc.compiler.frontends.gguf_tokenizer import build_tokenizer
from llmc.compiler.tokenizer import LlmcTokenizer


@pytest.fixture(scope="module")
def spm_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "tokenizers" / "llama2-spm"


@pytest.fixture(scope="module")
def spm_gguf(spm_dir: Path) -> Path:
    return spm_dir / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="module")
def spm_cases(spm_dir: Path) -> list[tuple[str, list[int]]]:
    texts = (spm_dir / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""
    texts = texts[:-1]
    lines = (spm_dir / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) == 46 and len(lines) >= 46
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines[:46], strict=True)]


@pytest.fixture(scope="module")
def spm_tokenizer(spm_gguf: Path) -> LlmcTokenizer:
    tokenizer = load_gguf(spm_gguf).tokenizer
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf: Path) -> LlmcTokenizer:
    tokenizer = load_gguf(smollm2_gguf).tokenizer
    assert tokenizer is not None
    return tokenizer


def test_spm_golden_vectors_all_46(spm_tokenizer: LlmcTokenizer, spm_cases: list[tuple[str, list[int]]]) -> None:
    failures = [(text, want, spm_tokenizer.encode(text, add_special_tokens=False))
                for text, want in spm_cases if spm_tokenizer.encode(text, add_special_tokens=False) != want]
    assert not failures, failures[:3]


def test_spm_bos_decode_and_special(spm_tokenizer: LlmcTokenizer, spm_cases: list[tuple[str, list[int]]]) -> None:
    for text, want in spm_cases[:12]:
        assert spm_tokenizer.encode(text) == [1, *want]  # add_bos_token true in the file
        if text.strip() == text and text:
            assert spm_tokenizer.decode(want) == text
    assert spm_tokenizer.decode([1, 15043, 3186, 2], skip_special_tokens=False) == "<s> Hello world</s>"
    assert spm_tokenizer.decode([1, 15043, 3186, 2]) == "Hello world"
    assert spm_tokenizer.meta.bos_token == "<s>" and spm_tokenizer.meta.eos_token_ids == [2]
    # byte fallback: a character outside the vocab becomes its UTF-8 bytes <0xNN>
    assert spm_tokenizer.encode("🦙", add_special_tokens=False) == [29871, 243, 162, 169, 156]


def test_cli_tokenize_matches_golden(spm_gguf: Path, spm_cases: list[tuple[str, list[int]]]) -> None:
    runner = CliRunner()
    text, want = spm_cases[18]  # ' this is 🦙.cpp'
    result = runner.invoke(main, ["tokenize", str(spm_gguf), "--text", text, "--json", "--no-special"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ids"] == want


def _vocab_gguf(path: Path, model: str, pre: str | None, tokens: list[str], merges: list[str] | None = None,
                types: list[int] | None = None, add_bos: bool | None = None, add_eos: bool | None = None) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if merges is not None:
        w.add_token_merges(merges)
    if types is not None:
        w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if add_eos is not None:
        w.add_add_eos_token(add_eos)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def _byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet, "Ġt", "he", "Ġthe", "12", "Ġ1"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ 1", "1 2"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, merges, types


@pytest.mark.parametrize("pre,digits", [("gpt2", ["Ġ1", "2", "3"]), ("llama-bpe", ["Ġ", "12", "3"]),
                                        ("smollm", ["Ġ", "1", "2", "3"]), ("qwen2", ["Ġ", "1", "2", "3"]),
                                        ("default", ["Ġ1", "2", "3"])])
def test_bpe_pre_tokenizers(pre: str, digits: list[str], tmp_path: Path) -> None:
    tokens, merges, types = _byte_level_vocab()
    path = _vocab_gguf(tmp_path / "v.gguf", "gpt2", pre, tokens, merges, types)
    meta = Metadata(open_gguf(path), path)
    tok = build_tokenizer(meta, ModelConfig(len(tokens), 8, 8, 1, 1, 1, 8, 16, bos_token_id=0, eos_token_ids=(1,)))
    ids = tok.encode("the 123", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids] == ["t", "he", *digits]
    assert tok.decode(ids) == "the 123"
    assert tok.encode("<s>the") == ([0] if pre == "llama-bpe" else []) + [0, tokens.index("t"), tokens.index("he")]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_unknown_pre_warns_and_uses_gpt2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens, merges, types = _byte_level_vocab()
    path = _vocab_gguf(tmp_path / "v.gguf", "gpt2", "mystery-pre", tokens, merges, types, add_bos=True, add_eos=True)
    meta = Metadata(open_gguf(path), path)
    with caplog.at_level(logging.WARNING):
        tok = build_tokenizer(meta, ModelConfig(len(tokens), 8, 8, 1, 1, 1, 8, 16, bos_token_id=0))
    assert "mystery-pre" in caplog.text
    assert [tok.id_to_token(i) for i in tok.encode(" the 123")] == ["<s>", "Ġthe", "Ġ1", "2", "3", "</s>"]
    assert tok.decode(tok.encode(" the 123")) == " the 123"
    assert tok.encode(" the", add_special_tokens=False) == [tokens.index("Ġthe")]


@pytest.mark.network
def test_smollm2_tokenizer_round_trips(smol_tokenizer: LlmcTokenizer) -> None:
    texts = ["The capital of France is", "Hello, world! 12345", "  two  spaces\n\n\ttab", "naïve café 日本語 🦙",
             "def f(x):\n    return x ** 2  # square", ""]
    for text in texts:
        ids = smol_tokenizer.encode(text)
        assert ids == smol_tokenizer.encode(text, add_special_tokens=False)  # add_bos_token false
        assert smol_tokenizer.decode(ids) == text
    ids = smol_tokenizer.encode("The capital of France is")
    assert [smol_tokenizer.id_to_token(i) for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert [smol_tokenizer.id_to_token(i) for i in smol_tokenizer.encode("2024")] == ["2", "0", "2", "4"]


@pytest.mark.network
def test_smollm2_chat_template(smol_tokenizer: LlmcTokenizer) -> None:
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                          "<|im_start|>assistant\n")
    ids = smol_tokenizer.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|> stay whole
    assert smol_tokenizer.meta.eos_token == "<|im_end|>" and 2 in smol_tokenizer.meta.eos_token_ids
