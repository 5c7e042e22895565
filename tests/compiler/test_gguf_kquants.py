"""GGUF files whose tensors use K-quants (and the other block types) compiled with the defaults: the
blocks are kept as stored, the artifact is not bigger than the file, and the model runs them.

Small files are written here (gguf-py for the legacy types, tests/compiler/gguf_util.kquantize for
K-quants); SmolLM2 requantized by llama.cpp's ``llama-quantize`` is used when the file exists
(``~/.cache/llmc/gguf/``, made by the benchmark instructions in docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from llmc.compiler.frontends.gguf_reader import open_gguf
from llmc.compiler.weights import QuantizedTensor
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact
from tests.compiler.gguf_util import hf_to_gguf
from tests.compiler.test_gguf import PROMPT, artifact_logits, greedy
from tests.helpers import assert_int8_activation_close
from tests.models import write_random_hf_model
from tests.targets.onnx_util import load_executor

MIX = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q3_K,
       "ffn_gate": Q.Q2_K, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_K, "output": Q.Q6_K}
LLAMA_QUANTIZE_FILES = Path.home() / ".cache" / "llmc" / "gguf"


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kquant")
    hf = write_random_hf_model(root / "hf", seed=5, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                               num_key_value_heads=2)
    return hf_to_gguf(hf, root / "mix.gguf", qtypes=MIX)


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "weights").iterdir())


def test_default_compile_keeps_every_block_as_stored(kquant_gguf: Path, tmp_path: Path) -> None:
    art = compile_model(kquant_gguf, tmp_path / "native")
    manifest = Artifact.load(art).manifest
    assert manifest["compile_options"]["quant"] == "native" and manifest["quantization"]["mode"] == "native"
    assert _weights_bytes(art) <= 1.15 * kquant_gguf.stat().st_size
    weights = Artifact.load(art).weights()
    stored = {t.name: t for t in open_gguf(kquant_gguf).tensors}
    for gguf_name, canonical in (("blk.0.attn_q.weight", "layers.0.q"), ("blk.1.ffn_gate.weight", "layers.1.gate"),
                                 ("blk.0.attn_output.weight", "layers.0.o"), ("output.weight", "lm_head")):
        t = stored[gguf_name]
        w = weights.get(canonical)
        if w is None:  # fused by the pipeline (qkv): the artifact holds the rows of the fused weight
            continue
        assert isinstance(w, QuantizedTensor) and w.spec.ggml == t.tensor_type.name
        assert np.array_equal(w.qdata.reshape(-1), np.asarray(t.data).reshape(-1))  # bit for bit
    qkv = weights.get("layers.0.qkv")
    assert qkv is None or qkv.spec.ggml is None  # q/k/v differ in type: not fused


def test_native_build_matches_the_dequantized_build(kquant_gguf: Path, tmp_path: Path) -> None:
    dense = artifact_logits(kquant_gguf, tmp_path / "dense", PROMPT, quant="none")
    exact = artifact_logits(kquant_gguf, tmp_path / "exact", PROMPT, target_options={"quant_kernels": "dequant"})
    np.testing.assert_allclose(exact, dense, atol=1e-4 * np.abs(dense).max(), rtol=0)  # the same float weights
    native = artifact_logits(kquant_gguf, tmp_path / "native", PROMPT)  # CPU default: int8 activations
    assert_int8_activation_close(native, dense)
    assert greedy(load_executor(tmp_path / "exact"), PROMPT, 12) == greedy(load_executor(tmp_path / "dense"),
                                                                          PROMPT, 12)
    assert _weights_bytes(tmp_path / "native") < _weights_bytes(tmp_path / "dense") / 4


def test_a_target_without_gguf_blocks_gets_them_converted_with_a_note(kquant_gguf: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    art = compile_model(kquant_gguf, tmp_path / "ref", CompileOptions(target="reference"))
    notes = Artifact.load(art).manifest["quantization"]["notes"]
    assert any("Q4_K" in n and "dequantized to float32" in n for n in notes)
    weights = Artifact.load(art).weights()
    assert isinstance(weights["embed"], QuantizedTensor) and weights["embed"].spec.ggml is None  # Q8_0: llmc's int8
    assert not isinstance(weights["layers.0.down"], QuantizedTensor)  # Q4_K: float32
    assert "dequantized to float32" in caplog.text


def test_quant_none_dequantizes_with_a_note_of_the_size(kquant_gguf: Path, tmp_path: Path) -> None:
    art = compile_model(kquant_gguf, tmp_path / "none", CompileOptions(quant="none"))
    (note,) = Artifact.load(art).manifest["quantization"]["notes"]
    assert "--quant none dequantizes" in note and "MB of matrices" in note


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "Q8_0"])
def test_smollm2_requantized_by_llama_cpp(kind: str, tmp_path: Path) -> None:
    path = LLAMA_QUANTIZE_FILES / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not made (llama-quantize --allow-requantize, docs/performance.md)")
    art = compile_model(path, tmp_path / "native")
    assert _weights_bytes(art) <= 1.15 * path.stat().st_size
    ex = load_executor(art)
    assert ex.native is not None
    from pydoc_data.topics import topics

    from llmc.runtime.evaluate import evaluate, reference_logits, score

    ids = Artifact.load(art).tokenizer().encode(topics["if"] + topics["while"] + topics["for"])[:1024]
    reference = reference_logits(load_executor(art, quant_kernels="dequant"), ids, window=512)  # float activations
    float_ppl = score(iter(reference), ids).perplexity
    got = evaluate(ex, ids, reference=reference, window=512)
    # int8 activations against float ones on the same blocks: measured +0.3..0.6% (8 windows of pydoc's
    # help text, every file here); 2% leaves room for a 1024-token sample's spread
    assert abs(got.perplexity / float_ppl - 1) < 0.02, (got.perplexity, float_ppl)
    assert got.top1_agreement is not None and got.top1_agreement > 0.9
