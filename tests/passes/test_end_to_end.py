"""End to end through the torch target: O0 and O2 agree on real models; the CLI shows the
fused graph (one QKV matmul per layer) and dumps the IR after every pass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.frontends.source import load_source
from llmc.compiler.ir.types import QuantSpec
from llmc.driver import CompileOptions, compile_model, frontend_module, optimize
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import Executor
from llmc.runtime.target import lowered_ops
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.target import TorchTarget
from tests.helpers import SequenceDriver
from tests.passes.util import llama_config, random_llama, run_pipeline


def _greedy(executor: Executor, prompt: list[int], steps: int) -> list[int]:
    driver = SequenceDriver(executor, blocks_per_seq=-(-(len(prompt) + steps) // executor.kv_spec().block_size),
                            max_seqs=1)
    ids = [int(np.argmax(driver.step({0: prompt}, all_rows=False)[0][-1]))]
    while len(ids) < steps:
        ids.append(int(np.argmax(driver.step({0: ids[-1:]}, all_rows=False)[0][-1])))
    return ids


def _logits(executor: Executor, prompt: list[int], decode: list[int]) -> list[np.ndarray]:
    """All-row prefill logits, then one decode step per id in ``decode``."""
    driver = SequenceDriver(executor, blocks_per_seq=4, max_seqs=1)
    return [driver.step({0: chunk})[0] for chunk in [prompt, *([t] for t in decode)]]


def _load(path: Path) -> Executor:
    return TorchTarget().load(Artifact.load(path))


def test_stories260k_o0_and_o2_give_the_golden_200_ids(stories_hf: Path, stories_expected_ids: list[int],
                                                       tmp_path: Path) -> None:
    ids = {}
    for level in (0, 2):
        art = tmp_path / f"o{level}"
        compile_model(stories_hf, art, CompileOptions(opt_level=level))
        ids[level] = _greedy(_load(art), [1], 200)
    assert ids[0] == stories_expected_ids
    assert ids[2] == stories_expected_ids


def test_cli_o2_artifact_has_one_qkv_matmul_per_layer_and_dumps_every_pass(stories_hf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    art, dump = tmp_path / "art", tmp_path / "dump"
    result = runner.invoke(main, ["compile", str(stories_hf), "-o", str(art), "--opt-level", "2", "--dump-ir",
                                  str(dump)])
    assert result.exit_code == 0, result.output
    torch_o2 = TorchTarget().preferred_passes(2)
    assert torch_o2 is not None and "fuse-gate-up" not in torch_o2  # measured slower on torch CPU
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["00-input.ir"] + [f"{i:02d}-{n}.ir" for i, n in enumerate(torch_o2, start=1)]
    result = runner.invoke(main, ["inspect", str(art), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    layers = summary["model"]["num_layers"]
    for fn in ("prefill", "decode"):
        counts = summary["op_counts"][fn]
        assert counts["split"] == layers  # one fused QKV matmul per layer, split three ways
        assert counts["linear"] == 5 * layers + 1  # qkv, o, gate, up, down per layer + the head
        assert counts["add_rms_norm"] == 2 * layers and counts["rope_attention"] == layers
    manifest = json.loads((art / "manifest.json").read_text())
    assert [p["name"] for p in manifest["pipeline"]["passes"]] == torch_o2
    assert manifest["pipeline"]["passes"][1]["stats"]["matches"] == 2 * layers
    params = manifest["params"]
    assert "lm_head" not in params and "embed" in params  # the tied head is stored once
    assert "layers.0.qkv" in params and "layers.0.q" not in params
    text = runner.invoke(main, ["inspect", str(art)]).output
    assert "fuse-qkv" in text and f"split={layers}" in text


def test_cli_custom_pipeline_with_an_unsupported_op_fails_cleanly(stories_hf: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    narrow = dataclasses.replace(TorchTarget().capabilities(), ops=lowered_ops("add_rms_norm"))
    monkeypatch.setattr(TorchTarget, "capabilities", lambda self: narrow)
    result = CliRunner().invoke(main, ["compile", str(stories_hf), "-o", str(tmp_path / "a"),
                                       "--passes", "fuse-add-rmsnorm,fuse-gate-up"])
    assert result.exit_code == 2
    assert "fuse-gate-up" in result.output and "swiglu" in result.output
    assert not (tmp_path / "a").exists()


def test_smollm2_o0_and_o2_logits_agree_in_fp32(smollm2_gguf: Path) -> None:
    source = load_source(smollm2_gguf)
    o0 = frontend_module(source, None)
    target = TorchTarget()
    o2, _ = optimize(o0, source.weights, CompileOptions(opt_level=2), target.capabilities().fused_ops, target.name,
                           target.preferred_passes(2))
    layers = source.config.num_layers
    assert o2.functions["decode"].op_counts()["split"] == layers
    prompt, decode = [1, 504, 3458, 314, 253, 1345, 28, 2], [30, 17, 945]
    a = _logits(TorchExecutor(o0, source.weights), prompt, decode)
    b = _logits(TorchExecutor(o2, source.weights), prompt, decode)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == np.float32
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec(4, 8, False), QuantSpec(8, 8, True)], ids=["int4a", "int8s"])
def test_torch_executor_runs_fused_quantized_projections(spec: QuantSpec) -> None:
    config = llama_config(layers=2, tied=True)
    quant = {f"layers.{i}.{p}": spec for i in range(2) for p in ("q", "k", "v", "gate", "up")}
    module, weights = random_llama(config, seed=11, quant=quant)
    fused, _ = run_pipeline(module, weights, 2, target_ops=TorchTarget().capabilities().fused_ops)
    assert fused.params["layers.0.qkv"].quant == spec and fused.params["layers.1.gate_up"].quant == spec
    prompt, decode = [3, 9, 27, 17, 4], [8, 2]
    a = _logits(TorchExecutor(module, weights), prompt, decode)
    b = _logits(TorchExecutor(fused, weights), prompt, decode)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-4)
