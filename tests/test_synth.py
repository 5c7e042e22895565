"""`llmc synth`: real shapes, both formats hold the same model, and every consumer loads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.errors import InputError
from llmc.synth import PRESETS, get_preset, param_count, synthesize
from llmc.synth.tokenizer import build_vocab
from llmc.synth.weights import tensor_specs
from llmc.synth.writers import llama3_rope_factors, permute_for_gguf
from tests.helpers import SequenceDriver

PROMPT = [508, 40, 41, 300, 12, 77, 200, 5, 9, 100, 260, 301]


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("tiny", tmp_path_factory.mktemp("synth") / "tiny", seed=3)


@pytest.fixture(scope="module")
def tiny_gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("tiny", tmp_path_factory.mktemp("synth") / "tiny.gguf", fmt="gguf", seed=3)


def _llmc_logits(source: Path, out: Path, ids: list[int]) -> np.ndarray:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.artifact import Artifact
    from llmc.runtime.registry import get_target

    artifact = Artifact.load(compile_model(source, out, CompileOptions()))
    return SequenceDriver(get_target(artifact.target).load(artifact)).step({0: ids})[0]


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    torch = pytest.importorskip("torch", reason="transformers reference needs torch")
    transformers = pytest.importorskip("transformers", reason="the reference is transformers' LlamaForCausalLM")
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_presets_have_the_published_parameter_counts() -> None:
    # Hugging Face model cards: Llama-3.2-1B 1,235,814,400; Llama-3.2-3B 3,212,749,824; SmolLM2-135M 134,515,008
    assert param_count(PRESETS["llama-3.2-1b"]) == 1_235_814_400
    assert param_count(PRESETS["llama-3.2-3b"]) == 3_212_749_824
    assert param_count(PRESETS["smollm2-135m"]) == 134_515_008
    smol = PRESETS["smollm2-135m"].hf_config  # as in SmolLM2-135M-Instruct.Q4_1.gguf's metadata
    assert (smol["num_hidden_layers"], smol["hidden_size"], smol["intermediate_size"]) == (30, 576, 1536)
    assert (smol["num_attention_heads"], smol["num_key_value_heads"], smol["rope_theta"]) == (9, 3, 100000.0)
    for name in ("llama-3.2-1b", "llama-3.2-3b"):
        cfg = PRESETS[name].hf_config
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is True
        assert cfg["vocab_size"] == 128256 and cfg["rope_theta"] == 500000.0


def test_unknown_preset_and_dtype_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown synth preset 'llama-9'"):
        get_preset("llama-9")
    with pytest.raises(InputError, match="unknown weight dtype"):
        synthesize("tiny", tmp_path / "x", dtype="int3")
    result = CliRunner().invoke(main, ["synth", "--preset", "nope", "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "unknown synth preset" in result.output


def test_vocab_fills_the_model_vocab_with_specials_at_their_ids() -> None:
    for name in ("llama-3.2-1b", "smollm2-135m", "tiny"):
        preset = PRESETS[name]
        vocab = build_vocab(preset)
        assert len(vocab.tokens) == preset.vocab_size == len(set(vocab.tokens))
        assert vocab.tokenizer().get_vocab_size() == preset.vocab_size
        for i, text in preset.specials.items():
            assert vocab.tokens[i] == text
    llama = build_vocab(PRESETS["llama-3.2-1b"])
    assert llama.tokens[128000] == "<|begin_of_text|>" and llama.tokens[128009] == "<|eot_id|>"
    assert len(llama.merges) > 100


def test_hf_folder_matches_transformers_and_compiles(tiny_hf_folder: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_hf_folder / "config.json").read_text())
    assert config == {**PRESETS["tiny"].hf_config, "torch_dtype": "float16"}
    ours = _llmc_logits(tiny_hf_folder, tmp_path / "art", PROMPT)
    ref = _hf_logits(tiny_hf_folder, PROMPT)
    # fp16-stored weights, float32 compute on both sides
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)
    assert np.abs(ref).max() > 0.5  # not a degenerate all-zero model


def test_tokenizer_files_load_in_transformers(tiny_hf_folder: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="AutoTokenizer is the consumer under test")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_folder)
    text = "Once upon a time, the compiler ran 1234 passes!"
    ids = tok(text)["input_ids"]
    assert ids[0] == 508 and len(ids) < len(text.encode())  # BOS, and merges were applied
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    a = synthesize("tiny", tmp_path / "a", seed=1)
    b = synthesize("tiny", tmp_path / "b", seed=1)
    c = synthesize("tiny", tmp_path / "c", seed=2)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] != data[2]


def test_large_models_are_sharded_with_an_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmc.synth.writers as writers
    from llmc.compiler.frontends.source import load_source

    monkeypatch.setattr(writers, "SHARD_BYTES", 40_000)
    out = synthesize("tiny", tmp_path / "sharded", seed=3, dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == {name for name, _ in tensor_specs(PRESETS["tiny"])}
    source = load_source(out)
    single = load_source(synthesize("tiny", tmp_path / "single", seed=3, dtype="float32"))
    for name in single.weights:
        np.testing.assert_array_equal(np.asarray(source.weights[name]), np.asarray(single.weights[name]))


def test_gguf_holds_the_same_weights_in_llama_cpp_layout(tiny_gguf_file: Path, tiny_hf_folder: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(str(tiny_gguf_file))
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("tokenizer.ggml.") or name.endswith(("model", "pre", "token_id"))}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.bos_token_id"] == 508
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    hf = load_file(str(tiny_hf_folder / "model.safetensors"))
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    np.testing.assert_array_equal(q, permute_for_gguf(hf["model.layers.1.self_attn.q_proj.weight"], 4))
    assert not np.array_equal(q, hf["model.layers.1.self_attn.q_proj.weight"])
    k = np.asarray(tensors["blk.0.attn_k.weight"].data)
    np.testing.assert_array_equal(k, permute_for_gguf(hf["model.layers.0.self_attn.k_proj.weight"], 2))
    np.testing.assert_array_equal(np.asarray(tensors["token_embd.weight"].data), hf["model.embed_tokens.weight"])
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    np.testing.assert_array_equal(factors, llama3_rope_factors(PRESETS["tiny"]))
    assert factors.min() == 1.0 and factors.max() == 8.0  # scaling is active in the tiny preset


def test_gguf_compiles_to_the_same_model_as_the_hf_folder(tiny_gguf_file: Path, tiny_hf_folder: Path,
                                                          tmp_path: Path) -> None:
    from llmc.compiler.frontends.source import load_source

    from_gguf = _llmc_logits(tiny_gguf_file, tmp_path / "g", PROMPT)
    from_hf = _llmc_logits(tiny_hf_folder, tmp_path / "h", PROMPT)
    np.testing.assert_allclose(from_gguf, from_hf, atol=1e-4, rtol=0)
    text = "Once upon a time, the compiler ran 1234 passes!"
    gguf_tok, hf_tok = load_source(tiny_gguf_file).tokenizer, load_source(tiny_hf_folder).tokenizer
    assert gguf_tok is not None and hf_tok is not None
    assert gguf_tok.encode(text) == hf_tok.encode(text)


def test_llama_cpp_runs_the_gguf_like_transformers_runs_the_folder(tiny_gguf_file: Path,
                                                                   tiny_hf_folder: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `peers` extra) is not installed")
    llm = llama_cpp.Llama(str(tiny_gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(PROMPT)
    ours = np.asarray(llm.scores[: len(PROMPT)], dtype=np.float32)
    ref = _hf_logits(tiny_hf_folder, PROMPT)
    np.testing.assert_allclose(ours, ref, atol=5e-3, rtol=0)
    assert llm.tokenize(b"Once upon a time", add_bos=True)[0] == 508


def test_cli_writes_both_formats(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["synth", "--preset", "tiny", "-o", str(tmp_path / "hf"), "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "tokenizer.json").exists() and "0.1M params" in result.output
    result = runner.invoke(main, ["synth", "--preset", "tiny", "-o", str(tmp_path / "g"), "--format", "gguf",
                                  "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "g" / "tiny.gguf").read_bytes()[:4] == b"GGUF"
