"""CPU schedules of the tvm target: ``--tune`` records are made, applied and correct; the GEMV schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "1")
pytest.importorskip("tvm", reason="apache-tvm is not installed (the tvm extra: pip install -e '.[tvm]')")
pytest.importorskip("cloudpickle", reason="meta-schedule needs cloudpickle (the tvm extra)")
pytest.importorskip("psutil", reason="meta-schedule needs psutil (the tvm extra)")

from llmc.compiler.ir.types import QuantSpec
from llmc.runtime.artifact import Artifact
from llmc.runtime.registry import get_target
from llmc.targets.tvm.target import PAYLOAD
from tests.helpers import SequenceDriver, interpret
from tests.targets.tvm_util import (
    quantize,
    random_weights,
    target_rewritten,
    tiny_config,
    tiny_module,
    write_artifact,
)

pytestmark = pytest.mark.tvm

# one sequence decoding alone (the static-shape ``decode_b1`` that tuning targets), then a
# ragged mixed batch and a two-sequence decode (the dynamic ``prefill`` and ``decode``)
STEPS: list[dict[int, list[int]]] = [
    {0: [1, 5, 9, 33, 7]}, {0: [11]}, {0: [64]}, {0: [3]},
    {0: [17], 1: [2, 60, 61]}, {0: [40], 1: [41]},
]


def _tuning(art: Artifact) -> dict:
    return json.loads(art.file(PAYLOAD).read_text())["tuning"]


def _tuned_kernels_differ(module, weights, tuning: dict) -> list[str]:
    """Names of the applied kernels whose TIR the tuning records changed (rebuilt from the log)."""
    import tvm_ffi
    from tvm.relax.transform import MetaScheduleApplyDatabase
    from tvm.s_tir import meta_schedule as ms

    from llmc.targets.tvm import build
    from llmc.targets.tvm.lower import lower_module
    from llmc.targets.tvm.schedules import fuse

    target = build.make_target(build.target_spec("cpu", None))
    fused = fuse(lower_module(target_rewritten(module, weights), target).mod, target)
    with target, ms.database.JSONDatabase(work_dir=tuning["log"]):
        tuned = MetaScheduleApplyDatabase()(fused)
    return [n for n in tuning["applied"] if not tvm_ffi.structural_equal(fused[n], tuned[n])]


def _assert_matches(art: Artifact, reference: Artifact, atol: float = 1e-4) -> None:
    got = SequenceDriver(get_target("tvm").load(art))
    want = SequenceDriver(get_target("torch").load(reference))
    for i, chunks in enumerate(STEPS):
        for g, w in zip(got.step(chunks), want.step(chunks), strict=True):
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"step {i}")


@pytest.mark.slow
def test_tune_applies_records_and_matches_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))  # a fresh tuning log
    config = tiny_config(num_layers=1)
    weights = random_weights(config, seed=7)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "tuned", tune=8)
    tuning = _tuning(art)
    assert not tuning["reused"] and tuning["records"] > 0
    assert tuning["applied"] and set(tuning["applied"]) <= set(tuning["tasks"])
    assert _tuned_kernels_differ(module, weights, tuning) == tuning["applied"]
    # 8 trials reach some kernels; the others get the untuned GEMV schedule
    assert set(tuning["applied"]) | set(tuning["untuned_gemv"]) == set(tuning["tasks"])
    assert any("kernels built from" in note for note in art.manifest["target"]["notes"])
    _assert_matches(art, write_artifact(module, weights, tmp_path / "torch", target_name="torch"))

    again = _tuning(write_artifact(module, weights, tmp_path / "again", tune=8))
    assert again["reused"] and again["log"] == tuning["log"] and again["applied"] == tuning["applied"]


def test_gemv_schedule_matches_torch_and_interpreter(tmp_path: Path) -> None:
    """``cpu_schedule=gemv`` (the default): float kernels vs the torch target, fused INT4/INT8 ones
    vs the interpreter."""
    config = tiny_config()
    weights = random_weights(config, seed=8)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "gemv")
    assert art.manifest["target"]["options"]["cpu_schedule"] == "gemv"
    # q, k/v, o+add, gate+silu*up, up, down+add, lm_head: every decode_b1 matmul kernel
    assert "gemv schedule (untuned) on 7 decode_b1 kernels" in art.manifest["target"]["notes"]
    # the same matmuls over a symbolic token count (prefill, batched decode): STEPS has odd counts,
    # so the predicated last token tile runs too
    assert "token-tiled matmul schedule on 7 prefill/decode kernels" in art.manifest["target"]["notes"]
    _assert_matches(art, write_artifact(module, weights, tmp_path / "torch", target_name="torch"))

    for name in list(weights):
        if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "gate", "up", "down", "lm_head"):
            spec = QuantSpec(4, 16, False) if name.endswith(("gate", "q", "lm_head")) else QuantSpec(8, 32, True)
            weights[name] = quantize(np.asarray(weights[name]), spec)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "gemv-q", cpu_schedule="gemv")
    want = interpret(module, weights, STEPS)
    driver = SequenceDriver(get_target("tvm").load(art))
    for i, chunks in enumerate(STEPS):
        for g, w in zip(driver.step(chunks), want[i], strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")


def test_tvm_own_cpu_pipeline_matches_torch(tmp_path: Path) -> None:
    """``cpu_schedule=tvm``: TVM's own (unscheduled) CPU pipeline, kept for comparison."""
    config = tiny_config()
    weights = random_weights(config, seed=9)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "tvm", cpu_schedule="tvm")
    assert art.manifest["target"]["options"]["cpu_schedule"] == "tvm"
    assert not any("gemv schedule" in note for note in art.manifest["target"]["notes"])
    _assert_matches(art, write_artifact(module, weights, tmp_path / "torch", target_name="torch"))
