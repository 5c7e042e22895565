"""The engine on the torch target (fp32): batch invariance, golden output, prefix cache, preemption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.compiler.ir.batch import BatchLayout
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.engine import Engine
from llmc.runtime.executor import StepBatch
from llmc.runtime.loader import load_model
from llmc.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny_artifact(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(tiny_hf, tmp_path_factory.mktemp("engine") / "tiny", CompileOptions())


def _workload(n: int = 32, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 1-40 tokens (some sharing a 20-token prefix) and 1-40 output tokens (vocab 128, context 128)."""
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(3, 128, size=20)]
    prompts = []
    for i in range(n):
        own = [int(t) for t in rng.integers(3, 128, size=int(rng.integers(1, 21)))]
        prompts.append(shared + own if i % 3 == 0 else own)
    params = [SamplingParams(max_tokens=int(rng.integers(1, 41)), temperature=0, ignore_eos=True) for _ in range(n)]
    return prompts, params


def _alone(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [engine.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]


def test_32_concurrent_greedy_requests_match_alone_deterministic(tiny_artifact: Path) -> None:
    prompts, params = _workload()
    with Engine.load(str(tiny_artifact), deterministic=True, max_running=32, max_num_tokens=64,
                     prefix_caching=False) as engine:
        together = engine.generate(prompts, params)
        alone = _alone(engine, prompts, params)
        stats = engine.stats()
    assert [o.token_ids for o in together] == alone
    assert stats["kv_used_blocks"] == 0


def test_preemption_and_prefix_cache_keep_deterministic_outputs(tiny_artifact: Path) -> None:
    prompts, params = _workload(seed=1)
    with Engine.load(str(tiny_artifact), deterministic=True, prefix_caching=False) as engine:
        reference = _alone(engine, prompts, params)
    # 24 blocks of 16 tokens for 32 requests of up to 100 tokens: queueing and preemption
    with Engine.load(str(tiny_artifact), deterministic=True, num_blocks=24, max_num_tokens=48) as engine:
        first = engine.generate(prompts, params)
        again = engine.generate(prompts, params)  # now mostly served from the prefix cache
        stats = engine.stats()
    assert [o.token_ids for o in first] == reference
    assert [o.token_ids for o in again] == reference
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert sum(o.num_cached_tokens for o in again) > 0
    assert stats["kv_used_blocks"] == 0


@pytest.mark.parametrize("chunk", [None, 64])
def test_deterministic_logits_are_bitwise_batch_invariant(tiny_artifact: Path, chunk: int | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from llmc.targets.torch import invariant

    if chunk is not None:  # exercise the chunked value sum (contexts longer than CHUNK keys)
        monkeypatch.setattr(invariant, "CHUNK", chunk)
    model = load_model(str(tiny_artifact), deterministic=True)
    ex = model.executor
    ex.init_cache(16)
    prompt = [5, 9, 14, 3, 77, 31, 8]

    def run(batches: list[StepBatch]) -> np.ndarray:
        return [ex.step(b) for b in batches][-1]

    n = len(prompt)
    whole = run([StepBatch(np.asarray(prompt), BatchLayout((0,), (n,), (n,)), [[0]], [n - 1])])
    chunks = run([StepBatch(np.asarray(prompt[:3]), BatchLayout((0,), (3,), (3,)), [[1]], [2]),
                  StepBatch(np.asarray(prompt[3:]), BatchLayout((0,), (n - 3,), (n,)), [[1]], [n - 4])])
    other = list(range(40, 60))
    mixed = run([StepBatch(np.asarray(other + prompt), BatchLayout((1, 0), (20, n), (20, n)), [[3, 4], [2]],
                           [19, 19 + n])])[1:]
    assert np.array_equal(whole, chunks) and np.array_equal(whole, mixed)
    fast = load_model(str(tiny_artifact)).executor
    fast.init_cache(16)
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(3, 128, size=100)]
    ref = fast.step(StepBatch(np.asarray(long_prompt), BatchLayout((0,), (100,), (100,)), [list(range(7))], [99]))
    got = ex.step(StepBatch(np.asarray(long_prompt), BatchLayout((0,), (100,), (100,)), [list(range(7, 14))], [99]))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # the same attention, another summation order
    ex.init_cache(16)
    ex.step(StepBatch(np.asarray(long_prompt[:60]), BatchLayout((0,), (60,), (60,)), [[15, 3, 9, 1]], [59]))
    split = ex.step(StepBatch(np.asarray(long_prompt[60:] + prompt), BatchLayout((0, 1), (40, n), (100, n)),
                              [[15, 3, 9, 1, 0, 2, 4], [5]], [39, 39 + n]))
    assert np.array_equal(split[:1], got)


@pytest.mark.parametrize("deterministic", [False, True])
def test_golden_inside_a_batch(stories_artifact: Path, stories_expected_ids: list[int], deterministic: bool) -> None:
    prompts, params = _workload(n=7, seed=2)
    prompts = [[1], *[[1] + [t % 512 for t in p] for p in prompts]]
    params = [SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), *params]
    with Engine.load(str(stories_artifact), deterministic=deterministic, max_num_tokens=32) as engine:
        outs = engine.generate(prompts, params)
    assert outs[0].token_ids == stories_expected_ids


def test_cli_prompts_file(tiny_artifact: Path, tmp_path: Path) -> None:
    from llmc.cli import main

    prompts, _ = _workload(n=5, seed=3)
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    result = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompts-file", str(path), "--max-tokens", "6",
                                       "--temperature", "0", "--ignore-eos", "--deterministic", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    with Engine.load(str(tiny_artifact), deterministic=True) as engine:
        alone = _alone(engine, prompts, [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 5)
    assert [line["token_ids"] for line in lines] == alone
    assert set(lines[0]) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings"}
    bad = CliRunner().invoke(main, ["run", str(tiny_artifact), "--prompt-ids", "1", "--prompts-file", str(path)])
    assert bad.exit_code == 2 and "exactly one" in bad.output
