"""The reference target (llmc's interpreter behind the executor contract) against Hugging Face
transformers, the stories260k golden ids, and itself under batching and prefix sharing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmc.compiler.errors import LlmcError, RequestError, UnsupportedError
from llmc.compiler.ir.batch import BatchLayout
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.registry import get_target
from llmc.runtime.sampling import SamplingParams
from tests.helpers import RAGGED_STEPS, SequenceDriver
from tests.models import hf_step_logits, write_random_hf_model

GQA_LLAMA3 = {"num_key_value_heads": 2, "tie_word_embeddings": True, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}


@pytest.mark.parametrize("opt_level", [0, 2])
def test_matches_transformers(opt_level: int, tmp_path: Path) -> None:
    """float64 interpreter vs transformers' float32: within float32 rounding of the logits (~1e-5)."""
    folder = write_random_hf_model(tmp_path / "hf", seed=5, **GQA_LLAMA3)
    art = compile_model(folder, tmp_path / "art", CompileOptions(target="reference", opt_level=opt_level))
    assert Artifact.load(art).manifest["target"]["options"]["dtype"] == "float64"
    prompt, decode = [1, 5, 9, 33, 7, 100, 64, 3], [11, 42, 99]
    driver = SequenceDriver(load_model(str(art)).executor)
    got = [driver.step({0: prompt})[0]] + [driver.step({0: [t]})[0] for t in decode]
    for step, (g, e) in enumerate(zip(got, hf_step_logits(folder, prompt, decode), strict=True)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=0, err_msg=f"step {step}")


def test_stories260k_golden_200_steps(stories_hf: Path, stories_expected_ids: list[int], tmp_path: Path) -> None:
    art = compile_model(stories_hf, tmp_path / "art", CompileOptions(target="reference"))
    result = generate_ids(load_model(str(art)), [1], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    assert result.token_ids == stories_expected_ids


def test_ragged_steps_match_each_sequence_alone(stories_hf: Path, tmp_path: Path) -> None:
    art = Artifact.load(compile_model(stories_hf, tmp_path / "art", CompileOptions(target="reference")))
    together = SequenceDriver(get_target("reference").load(art))
    mixed = [together.step(chunks) for chunks in RAGGED_STEPS]
    for seq in (0, 3, 7):
        alone = SequenceDriver(get_target("reference").load(art))
        steps = [(i, list(chunks).index(seq)) for i, chunks in enumerate(RAGGED_STEPS) if seq in chunks]
        for i, j in steps:
            got = alone.step({seq: RAGGED_STEPS[i][seq]})[0]
            np.testing.assert_allclose(mixed[i][j], got, atol=1e-9, rtol=0, err_msg=f"seq {seq} step {i}")


def test_engine_with_prefix_caching_matches_generate(stories_hf: Path, tmp_path: Path) -> None:
    """The engine over the reference's paged cache: shared prompt prefixes (copy-on-write blocks) and
    continuous batching give the ids each prompt gets alone."""
    from llmc.runtime.engine import Engine

    art = compile_model(stories_hf, tmp_path / "art", CompileOptions(target="reference"))
    shared = [1, 403, 407, 261, 378, 432, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101]
    prompts = [[*shared, 5], [*shared, 6, 7], [1, 300, 301], shared]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [generate_ids(load_model(str(art)), p, params).token_ids for p in prompts]
    with Engine.load(str(art), max_running=3) as engine:
        outs = [o.token_ids for o in engine.generate(prompts, [params] * len(prompts))]
        assert engine.stats()["prefix_cache_hits"] > 0
    assert outs == alone


def test_in_memory_module_and_clear_errors(tiny_hf: Path, tmp_path: Path) -> None:
    art = Artifact.load(compile_model(tiny_hf, tmp_path / "art", CompileOptions()))  # a torch artifact
    target = get_target("reference")
    assert target.capabilities().runs_in_memory
    f32 = target.load_module(art.module, art.weights(), dtype="float32")
    f64 = target.load_module(art.module, art.weights())
    a, b = SequenceDriver(f32).step({0: [1, 2, 3]})[0], SequenceDriver(f64).step({0: [1, 2, 3]})[0]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    with pytest.raises(UnsupportedError, match="cpu"):
        target.load_module(art.module, art.weights(), device="cuda")
    with pytest.raises(LlmcError, match="float64 or float32"):
        target.load_module(art.module, art.weights(), dtype="int8")
    fresh = target.load_module(art.module, art.weights())
    with pytest.raises(LlmcError, match="init_cache"):
        fresh.step(StepBatch(np.asarray([1]), BatchLayout((0,), (1,), (1,)), [[0]], np.asarray([0])))
    fresh.init_cache(4)
    with pytest.raises(RequestError, match="token ids"):
        fresh.step(StepBatch(np.asarray([10_000]), BatchLayout((0,), (1,), (1,)), [[0]], np.asarray([0])))
    with pytest.raises(UnsupportedError, match="deterministic"):
        load_model(str(compile_model(tiny_hf, tmp_path / "ref", CompileOptions(target="reference"))),
                   deterministic=True)
