"""The torch target against Hugging Face transformers and the reference target (llmc's
interpreter behind the same executor interface)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmc.compiler.frontends.source import load_source
from llmc.driver import CompileOptions, compile_model, frontend_module
from llmc.runtime.artifact import Artifact
from llmc.runtime.registry import get_target
from tests.helpers import SequenceDriver
from tests.models import hf_step_logits, write_random_hf_model

CASES = {
    "mha_untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "gqa_untied": {"num_key_value_heads": 2, "tie_word_embeddings": False},
    "gqa_tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "mha_tied_llama3_rope": {
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "rope_theta": 500000.0,
    },
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opt_level", [0, 2])
def test_matches_transformers(case: str, opt_level: int, tmp_path: Path) -> None:
    folder = write_random_hf_model(tmp_path / "hf", seed=hash(case) % 1000, **CASES[case])
    art = compile_model(folder, tmp_path / "art", CompileOptions(opt_level=opt_level))
    artifact = Artifact.load(art)
    executor = get_target("torch").load(artifact)
    prompt, decode = [1, 5, 9, 33, 7, 100, 64, 3], [11, 42, 99, 5]
    expected = hf_step_logits(folder, prompt, decode)
    driver = SequenceDriver(executor)
    got = [driver.step({0: prompt})[0]] + [driver.step({0: [t]})[0] for t in decode]
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=0, err_msg=f"{case} step {step}")


def test_interpreter_matches_transformers(tmp_path: Path) -> None:
    folder = write_random_hf_model(tmp_path / "hf", seed=3)
    source = load_source(folder)
    module = frontend_module(source, None)
    prompt, decode = [1, 5, 9, 33, 7], [11, 42]
    expected = hf_step_logits(folder, prompt, decode)
    reference = SequenceDriver(get_target("reference").load_module(module, source.weights))
    got = [reference.step(chunks) for chunks in [{0: prompt}] + [{0: [t]} for t in decode]]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g[0], e, atol=1e-4, rtol=0)


def test_ragged_batch_equals_each_alone(tiny_hf: Path, tmp_path: Path) -> None:
    art = Artifact.load(compile_model(tiny_hf, tmp_path / "art", CompileOptions()))
    prompts = {0: [1, 4, 6, 8, 10, 12, 14], 1: [1, 9], 2: [1, 3, 5, 7, 11]}
    alone = {}
    for seq, prompt in prompts.items():
        d = SequenceDriver(get_target("torch").load(art))
        alone[seq] = [d.step({seq: prompt})[0], d.step({seq: [20 + seq]})[0]]
    together = SequenceDriver(get_target("torch").load(art))
    first = together.step(prompts)
    # mixed step: seq 0 decodes while seq 1 and 2 decode too; then a mixed prefill+decode step
    second = together.step({seq: [20 + seq] for seq in prompts})
    for i, seq in enumerate(prompts):
        np.testing.assert_allclose(first[i], alone[seq][0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(second[i], alone[seq][1], atol=1e-5, rtol=0)
    mixed = together.step({0: [30], 3: [1, 2, 3, 4]})
    reference = SequenceDriver(get_target("reference").load_module(art.module, art.weights()))
    ref = [reference.step(chunks) for chunks in [prompts, {s: [20 + s] for s in prompts}, {0: [30], 3: [1, 2, 3, 4]}]]
    np.testing.assert_allclose(mixed[0], ref[2][0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(mixed[1], ref[2][1], atol=1e-4, rtol=0)


def test_stories260k_golden_200_steps(stories_hf: Path, stories_expected_ids: list[int], tmp_path: Path) -> None:
    from llmc.runtime.generate import generate_ids
    from llmc.runtime.loader import load_model
    from llmc.runtime.sampling import SamplingParams

    art = compile_model(stories_hf, tmp_path / "art", CompileOptions())
    model = load_model(str(art))
    result = generate_ids(model, [1], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    assert result.token_ids == stories_expected_ids
