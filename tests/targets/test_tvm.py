"""The tvm target on the CPU (llvm): exact greedy ids, parity with torch, the paged cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# One TVM worker thread: TVM's spinning thread pool degrades badly on a loaded 2-core CI machine.
os.environ.setdefault("TVM_NUM_THREADS", "1")
pytest.importorskip("tvm", reason="apache-tvm is not installed (the tvm extra: pip install -e '.[tvm]')")

from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import WeightStore
from llmc.driver import CompileOptions, compile_model
from llmc.errors import LlmcError, RequestError
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.registry import get_target
from llmc.runtime.sampling import SamplingParams
from llmc.targets.tvm.rope import interleaved_to_half
from tests.helpers import RAGGED_STEPS, SequenceDriver, interpret
from tests.targets.tvm_util import LLAMA3, quantize, random_weights, tiny_config, tiny_module, write_artifact

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def stories_tvm(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(stories_hf, tmp_path_factory.mktemp("tvm") / "stories", CompileOptions(target="tvm"))


def _greedy(path: Path, n: int = 200) -> list[int]:
    model = load_model(str(path))
    return generate_ids(model, [1], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)).token_ids


def test_stories_greedy_200_exact(stories_tvm: Path, stories_expected_ids: list[int]) -> None:
    assert _greedy(stories_tvm) == stories_expected_ids
    manifest = Artifact.load(stories_tvm).manifest
    assert manifest["target"]["options"]["device"] == "cpu"
    assert (stories_tvm / "target" / "tvm" / "model.so").stat().st_size > 0


def test_stories_gguf_interleaved_rope_greedy_exact(stories_gguf: Path, stories_expected_ids: list[int],
                                                    tmp_path: Path) -> None:
    """GGUF stores q/k for interleaved (GGML) RoPE: TVM's gptj rope mode."""
    art = compile_model(stories_gguf, tmp_path / "gguf", CompileOptions(target="tvm"))
    payload = Artifact.load(art).manifest["target"]["notes"]
    assert any("interleaved via TVM gptj" in n for n in payload)
    assert _greedy(art) == stories_expected_ids


def test_logits_match_torch_on_ragged_batches(stories_tvm: Path, stories_artifact: Path) -> None:
    tvm_exec = get_target("tvm").load(Artifact.load(stories_tvm))
    torch_exec = get_target("torch").load(Artifact.load(stories_artifact))
    tvm_drv, torch_drv = SequenceDriver(tvm_exec), SequenceDriver(torch_exec)
    for i, chunks in enumerate(RAGGED_STEPS):
        all_rows = i != 2
        got, want = tvm_drv.step(chunks, all_rows=all_rows), torch_drv.step(chunks, all_rows=all_rows)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")


def test_sequences_are_released_and_rolled_back(stories_tvm: Path) -> None:
    ex = get_target("tvm").load(Artifact.load(stories_tvm))
    ex.init_cache(8)
    prompt = [1, 403, 407, 261]

    def run(seq: int, ids: list[int], past: int) -> np.ndarray:
        n = len(ids)
        batch = StepBatch(np.asarray(ids), BatchLayout((seq,), (n,), (past + n,)), [[0]], [n - 1])
        return ex.step(batch)[0]

    first = run(5, prompt, 0)
    run(5, [378], 4)
    again = run(5, [378], 4)  # the step says 4 cached tokens: the cache drops the 5th (popn)
    restart = run(5, prompt, 0)  # a reused id starting from zero is a new sequence
    np.testing.assert_allclose(restart, first, atol=1e-6)
    ex.release(5)
    assert 5 not in ex.seq_lens
    np.testing.assert_allclose(run(5, prompt, 0), first, atol=1e-6)
    ref = run(6, prompt, 0)
    np.testing.assert_allclose(run(6, [378], 4), again, atol=1e-5)
    assert ref.shape == first.shape
    with pytest.raises(LlmcError, match="new to the tvm kv cache"):
        run(9, [378], 4)
    with pytest.raises(RequestError, match="token ids"):
        run(6, [100000], 5)


def _compare_with_interpreter(module, weights: WeightStore, art: Artifact, atol: float) -> None:
    steps = [{0: [1, 5, 9, 33, 7], 1: [2, 60]}, {0: [11], 1: [42, 43, 44]}, {1: [3]}]
    want = interpret(module, weights, steps)
    driver = SequenceDriver(get_target("tvm").load(art))
    for i, chunks in enumerate(steps):
        for g, w in zip(driver.step(chunks), want[i], strict=True):
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"step {i}")


def test_interleaved_rope_with_llama3_scaling_permutes_qk(tmp_path: Path) -> None:
    """TVM has no interleaved llama3 rope: q/k rotary dims are permuted to rotate-half instead."""
    config = tiny_config(rope_style="interleaved", rope_scaling=LLAMA3, rope_theta=500000.0)
    weights = random_weights(config, seed=3)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "art")
    rope = json.loads(art.file("target/tvm/tvm.json").read_text())["rope"]
    assert rope["permute_qk"] and rope["rope_scaling"]["rope_type"] == "llama3"
    _compare_with_interpreter(module, weights, art, atol=1e-4)


def test_partial_rotary_dim_half_rope(tmp_path: Path) -> None:
    config = tiny_config(rotary_dim=4, head_dim=8)
    weights = random_weights(config, seed=4)
    module = tiny_module(config, weights)
    _compare_with_interpreter(module, weights, write_artifact(module, weights, tmp_path / "art"), atol=1e-4)


def test_int4_int8_dequantization_fused_into_matmul(tmp_path: Path) -> None:
    config = tiny_config()
    weights = random_weights(config, seed=5)
    specs = {"q": QuantSpec(4, 16, False), "k": QuantSpec(4, 8, True), "v": QuantSpec(8, 32, True),
             "o": QuantSpec(8, 16, False), "gate": QuantSpec(4, 32, False), "up": QuantSpec(4, 16, True),
             "down": QuantSpec(4, 16, False)}
    for name in list(weights):
        kind = name.rsplit(".", 1)[-1]
        if kind in specs:
            weights[name] = quantize(np.asarray(weights[name]), specs[kind])
    weights["lm_head"] = quantize(np.asarray(weights["lm_head"]), QuantSpec(8, 32, True))
    weights["embed"] = quantize(np.asarray(weights["embed"]), QuantSpec(4, 32, False, "float32"))
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "art")
    library = (art.path / "target" / "tvm" / "model.so").read_bytes()
    assert b"dequantize_matmul" in library  # one PrimFunc holds both stages
    _compare_with_interpreter(module, weights, art, atol=1e-4)


def test_interleaved_to_half_permutation() -> None:
    perm = interleaved_to_half(8, 6)
    assert perm.tolist() == [0, 2, 4, 1, 3, 5, 6, 7]


def test_cli_errors_are_one_line(stories_hf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    result = CliRunner().invoke(main, ["compile", str(stories_hf), "--target", "tvm", "--device", "cuda",
                                       "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "needs --arch" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["compile", str(stories_hf), "--target", "tvm", "--device", "tpu",
                                       "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "cpu, cuda, rocm" in result.output


def test_engine_batches_over_tvm_and_frees_sequences(stories_tvm: Path) -> None:
    from llmc.runtime.engine import Engine

    prompts = [[1, 403, 407], [1, 261], [1, 378, 1, 70, 9], [1]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [generate_ids(load_model(str(stories_tvm)), p, params).token_ids for p in prompts]
    engine = Engine.load(str(stories_tvm), max_running=4)
    with engine:
        outs = engine.generate(prompts, params)
        assert engine.stats()["prefix_cache_hits"] == 0
        assert engine.executor.seq_lens == {}, "finished sequences keep their TVM pages"
    assert [o.token_ids for o in outs] == alone
