"""GGUF front end: real files, GGUFs written from random HF Llamas, native quant blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmc.compiler.config import RopeScaling
from llmc.compiler.frontends.gguf import load_gguf
from llmc.compiler.frontends.gguf_config import fit_llama3_scaling
from llmc.compiler.frontends.gguf_reader import open_gguf
from llmc.compiler.frontends.gguf_tensors import read_tensor
from llmc.compiler.frontends.source import load_source
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.interp import Interpreter, NumpyKVCache
from llmc.compiler.ir.rope import inv_frequencies
from llmc.compiler.weights import QuantizedTensor
from llmc.driver import CompileOptions, compile_model, frontend_module
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor, StepBatch
from llmc.runtime.registry import get_target
from tests.compiler.gguf_util import hf_to_gguf, llama3_rope_freqs
from tests.helpers import assert_int8_activation_close
from tests.models import write_random_hf_model

PROMPT = [1, 5, 17, 99, 3, 64, 42, 7, 120, 33, 8, 2]
NATIVE_MIX = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
              "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0, "output": Q.Q4_1}


def load_executor(path: Path) -> Executor:
    artifact = Artifact.load(path)
    return get_target(artifact.target).load(artifact)


def greedy(executor: Executor, prompt: list[int], steps: int) -> list[int]:
    """Greedy ids after ``prompt``: one prefill step, then one decode step per token."""
    blocks = -(-(len(prompt) + steps) // executor.kv_spec().block_size)
    executor.init_cache(blocks)
    table = [list(range(blocks))]
    ids, out = list(prompt), []
    n = len(prompt)
    logits = executor.step(StepBatch(np.asarray(ids), BatchLayout((0,), (n,), (n,)), table, np.asarray([n - 1])))
    for _ in range(steps):
        out.append(int(np.argmax(logits[0])))
        n += 1
        if len(out) == steps:
            break
        logits = executor.step(StepBatch(np.asarray(out[-1:]), BatchLayout((0,), (1,), (n,)), table, np.asarray([0])))
    return out


def executor_logits(executor: Executor, ids: list[int]) -> np.ndarray:
    """All-row prefill logits of one sequence."""
    n = len(ids)
    blocks = -(-n // executor.kv_spec().block_size)
    executor.init_cache(blocks)
    layout = BatchLayout((0,), (n,), (n,))
    return executor.step(StepBatch(np.asarray(ids), layout, [list(range(blocks))], np.arange(n)))


def artifact_logits(source: Path, out: Path, ids: list[int], **options: object) -> np.ndarray:
    path = compile_model(source, out, CompileOptions(**options))  # type: ignore[arg-type]
    return executor_logits(load_executor(path), ids)


def interpreter_logits(source: Path, ids: list[int], native_quant: bool = False) -> np.ndarray:
    src = load_source(source, native_quant=native_quant)
    module = frontend_module(src, None)
    layout = BatchLayout((0,), (len(ids),), (len(ids),))
    inputs = {"input_ids": np.asarray(ids), "positions": np.asarray(layout.positions()),
              "logits_index": np.arange(len(ids))}
    return Interpreter(module, src.weights).run("prefill", inputs, layout, NumpyKVCache())["logits"]


def hf_logits(hf: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random GQA HF Llama (untied head) and its F32 GGUF with llama.cpp's Q/K permutation."""
    root = tmp_path_factory.mktemp("gguf_pair")
    hf = write_random_hf_model(root / "hf", seed=3)
    return hf, hf_to_gguf(hf, root / "model-f32.gguf")


def test_stories_gguf_greedy_200_matches_golden(stories_gguf: Path, stories_expected_ids: list[int],
                                                 tmp_path: Path) -> None:
    art = compile_model(stories_gguf, tmp_path / "stories", CompileOptions())
    assert greedy(load_executor(art), [1], 200) == stories_expected_ids


def test_stories_gguf_config_and_tied_head(stories_gguf: Path, stories_hf: Path) -> None:
    gg, hf = load_gguf(stories_gguf), load_source(stories_hf)
    assert gg.config.rope_style == "interleaved" and hf.config.rope_style == "half"
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_ids"):
        assert getattr(gg.config, field) == getattr(hf.config, field), field
    assert gg.weights["lm_head"] is gg.weights["embed"]
    assert gg.weights["layers.2.down"].shape == (64, 172)
    np.testing.assert_array_equal(gg.weights["layers.4.v"], hf.weights["layers.4.v"])
    assert gg.tokenizer is not None and gg.tokenizer.encode("Once upon a time")[0] == 1


def test_gguf_logits_equal_hf_folder(random_pair: tuple[Path, Path], tmp_path: Path) -> None:
    hf, gguf = random_pair
    ref = hf_logits(hf, PROMPT)
    torch_gguf = artifact_logits(gguf, tmp_path / "g", PROMPT)
    np.testing.assert_allclose(torch_gguf, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(interpreter_logits(gguf, PROMPT), ref, atol=1e-4, rtol=0)
    # the HF-layout path agrees too, so the interleaved RoPE is what undoes llama.cpp's permutation
    np.testing.assert_allclose(interpreter_logits(hf, PROMPT), ref, atol=1e-4, rtol=0)


def test_gguf_tied_output_and_llama3_rope_freqs(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    hf = write_random_hf_model(tmp_path / "hf", seed=5, tie_word_embeddings=True, rope_scaling=scaling)
    gguf = hf_to_gguf(hf, tmp_path / "tied.gguf")
    src = load_gguf(gguf)
    assert src.config.tie_word_embeddings and src.weights["lm_head"] is src.weights["embed"]
    assert src.config.rope_scaling is not None
    ids = list(range(3, 60, 2))  # positions past the original context, where scaling matters
    np.testing.assert_allclose(interpreter_logits(gguf, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_fit_llama3_scaling_reproduces_llama_cpp_factors() -> None:
    for theta, dim, (factor, low, high, ctx) in [(500000.0, 128, (8.0, 1.0, 4.0, 8192)),
                                                 (500000.0, 64, (32.0, 1.0, 4.0, 8192)),
                                                 (10000.0, 16, (4.0, 2.0, 8.0, 64))]:
        factors = llama3_rope_freqs(theta, dim, factor, low, high, ctx).astype(np.float64)
        fitted = fit_llama3_scaling(factors, theta, dim, "test")
        assert isinstance(fitted, RopeScaling)
        attrs = {"rotary_dim": dim, "theta": theta, "scaling": "llama3", "factor": fitted.factor,
                 "low_freq_factor": fitted.low_freq_factor, "high_freq_factor": fitted.high_freq_factor,
                 "original_max_position": fitted.original_max_position}
        plain = inv_frequencies({"rotary_dim": dim, "theta": theta})
        np.testing.assert_allclose(plain / inv_frequencies(attrs), factors, rtol=1e-5)
    assert fit_llama3_scaling(np.ones(8), 10000.0, 16, "test") is None


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_native_blocks_dequantize_bit_exactly(qtype: Q, tmp_path: Path) -> None:
    from gguf import GGUFWriter

    from llmc.compiler.frontends.gguf_tensors import llmc_layout

    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((24, 160)) * rng.uniform(0.01, 3.0, (24, 1))).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block (scale 0)
    path = tmp_path / "q.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", gguf_quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = open_gguf(path).tensors
    native = read_tensor(t, path, native_quant=True)
    assert isinstance(native, QuantizedTensor) and native.spec.ggml == qtype.name
    assert np.array_equal(native.qdata.reshape(-1), np.asarray(t.data).reshape(-1))  # the blocks as stored
    expected = gguf_dequantize(np.asarray(t.data), qtype)
    assert native.dequantize().view(np.uint32).tobytes() == expected.astype(np.float32).view(np.uint32).tobytes()
    ours = llmc_layout(native)  # what targets without GGUF blocks get: llmc's int4/int8 groups, exactly
    assert ours.spec.group_size == 32 and ours.spec.bits == (8 if qtype == Q.Q8_0 else 4) and ours.spec.ggml is None
    assert ours.spec.symmetric == (qtype != Q.Q4_1) and ours.scales.dtype == np.float16
    assert ours.dequantize().view(np.uint32).tobytes() == expected.astype(np.float32).view(np.uint32).tobytes()
    dense = read_tensor(t, path, native_quant=False)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32 and np.array_equal(dense, expected)
    assert native.nbytes == ours.nbytes == t.n_bytes


def test_native_quant_model_equals_dequantized_fp32(random_pair: tuple[Path, Path], tmp_path: Path) -> None:
    hf, _ = random_pair
    gguf = hf_to_gguf(hf, tmp_path / "mixed.gguf", qtypes=NATIVE_MIX)
    native = load_gguf(gguf, native_quant=True)
    assert isinstance(native.weights["embed"], QuantizedTensor)
    assert isinstance(native.weights["lm_head"], QuantizedTensor)
    assert all(not isinstance(w, QuantizedTensor) for w in load_gguf(gguf).weights.values())
    dense_torch = artifact_logits(gguf, tmp_path / "dense", PROMPT, quant="none")
    exact = artifact_logits(gguf, tmp_path / "exact", PROMPT, target_options={"quant_kernels": "dequant"})
    np.testing.assert_allclose(exact, dense_torch, atol=1e-5, rtol=0)
    np.testing.assert_allclose(interpreter_logits(gguf, PROMPT, native_quant=True), dense_torch, atol=1e-4, rtol=0)
    # the default (the GGUF's blocks, int8 activations on CPU): within the int8 activations' error
    native_torch = artifact_logits(gguf, tmp_path / "native", PROMPT)
    assert_int8_activation_close(native_torch, dense_torch)
    # the blocks really are quantized: the logits moved away from the float model's
    assert np.abs(dense_torch - hf_logits(hf, PROMPT)).max() > 1e-3
    native_art = tmp_path / "native"
    dense_art = tmp_path / "dense"
    size = {p: sum(f.stat().st_size for f in (p / "weights").iterdir()) for p in (native_art, dense_art)}
    assert size[native_art] < size[dense_art] / 3
    assert size[native_art] <= 1.15 * gguf.stat().st_size


def test_native_quant_rejects_hf_source(random_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from llmc.errors import LlmcError

    with pytest.raises(LlmcError, match="native"):
        compile_model(random_pair[0], tmp_path / "x", CompileOptions(quant="native"))


def test_kquant_and_half_types_dequantize(random_pair: tuple[Path, Path], tmp_path: Path) -> None:
    hf, f32 = random_pair
    mix = {"attn_q": Q.F16, "attn_k": Q.Q5_0, "attn_v": Q.Q5_1, "ffn_down": Q.Q8_0}
    gguf = hf_to_gguf(hf, tmp_path / "k.gguf", qtypes=mix)
    src, ref = load_gguf(gguf, native_quant=False), load_gguf(f32)
    for name, tol in (("layers.0.q", 1e-3), ("layers.0.k", 0.02), ("layers.1.v", 0.02), ("layers.1.down", 5e-3)):
        w = src.weights[name]
        assert isinstance(w, np.ndarray) and w.dtype == np.float32
        np.testing.assert_allclose(w, ref.weights[name], atol=tol)
    assert load_gguf(gguf, native_quant=True).weights["layers.0.q"].dtype == np.float16


@pytest.mark.network
def test_smollm2_native_blocks_bit_exact(smollm2_gguf: Path) -> None:
    reader = open_gguf(smollm2_gguf)
    tensors = {t.name: t for t in reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        t = tensors[name]
        native = read_tensor(t, smollm2_gguf, native_quant=True)
        assert isinstance(native, QuantizedTensor)
        assert np.array_equal(native.dequantize(), gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(
            native.shape))


@pytest.mark.network
def test_smollm2_native_quant_completes_paris(smollm2_gguf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    out = tmp_path / "smol"
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(smollm2_gguf), "-o", str(out), "--quant", "native"])
    assert result.exit_code == 0, result.output
    weights = Artifact.load(out).weights()
    down = weights["layers.0.down"]
    assert isinstance(down, QuantizedTensor) and down.spec.describe() == "ggml_q4_1"
    result = runner.invoke(main, ["run", str(out), "--prompt", "The capital of France is", "--max-tokens", "3",
                                  "--temperature", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert "Paris" in json.loads(result.output)["text"]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random blocks hold NaN scales too
@pytest.mark.parametrize("qtype", [Q.BF16, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_other_types_dequantize_with_gguf(qtype: Q, tmp_path: Path) -> None:
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    if qtype == Q.BF16:
        raw = gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    else:  # random blocks: every bit pattern is a valid block
        raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = open_gguf(path).tensors
    expected = gguf_dequantize(raw, qtype).astype(np.float32)
    assert expected.shape == (rows, cols)
    dense = read_tensor(t, path, native_quant=False)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32 and dense.shape == (rows, cols)
    assert np.array_equal(dense, expected, equal_nan=True)
    kept = read_tensor(t, path, native_quant=True)
    if qtype == Q.BF16:
        assert not isinstance(kept, QuantizedTensor)
        assert np.array_equal(np.asarray(kept, dtype=np.float32), expected, equal_nan=True)
    else:  # kept as stored, decoded exactly
        assert isinstance(kept, QuantizedTensor) and kept.spec.ggml == qtype.name and kept.nbytes == raw.nbytes
        assert np.array_equal(kept.dequantize(), expected, equal_nan=True)
