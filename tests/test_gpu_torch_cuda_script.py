"""benchmarks/gpu/torch_cuda.py (the CUDA path's device script) on a CPU: its plan, arguments and summary
schema (``--dry-run``), the budget and stage dependencies, and its measurement loops run on the torch
target's CPU executor (the same launch() calls the GPU run makes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "torch_cuda.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script(SCRIPT, "llmc_torch_cuda_device")


def test_dry_run_writes_the_plan_in_the_summary_schema(script: ModuleType, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert script.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["schema"] == script.SCHEMA and summary["dry_run"] is True and summary["budget_s"] == 450
    names = [s["name"] for s in summary["stages"]]
    assert names == list(script.STAGES)
    assert all(s["status"] == "planned" for s in summary["stages"])
    outputs = [f for s in summary["stages"] if s["output"] for f in s["output"].split()]
    assert len(outputs) + 1 <= 8, "the device tool returns at most 8 files (summary.json included)"
    stage = {s["name"]: s for s in summary["stages"]}
    bench = " ".join(stage["bench"]["cmd"])
    assert "--batch-sizes 1,32,256" in bench and "--quant" not in bench
    assert "--quant int4" in " ".join(stage["compile"]["cmd"]) and "activation_dtype=bfloat16" in \
        " ".join(stage["compile"]["cmd"])
    assert "--engines hf-compile" in " ".join(stage["peers"]["cmd"])
    assert "llama-3.2-1b" in " ".join(stage["synth"]["cmd"])
    assert "--concurrency 100,256" in " ".join(stage["serve"]["cmd"])
    assert "summary.json" not in capsys.readouterr().err


def test_stage_subset_unknown_stage_and_budget(script: ModuleType, tmp_path: Path) -> None:
    assert script.main(["--dry-run", "--out", str(tmp_path), "--stages", "roofline,synth"]) == 0
    assert [s["name"] for s in json.loads((tmp_path / "summary.json").read_text())["stages"]] == ["roofline", "synth"]
    with pytest.raises(SystemExit, match="unknown stage"):
        script.main(["--dry-run", "--out", str(tmp_path), "--stages", "roofline,gpu"])
    with pytest.raises(SystemExit):
        script.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"])


def test_a_failed_stage_skips_what_needs_it_and_the_budget_bounds_the_rest(script: ModuleType, tmp_path: Path) -> None:
    plan = script.Plan(tmp_path, tmp_path, 30.0, [
        script.Stage("synth", [sys.executable, "-c", "raise SystemExit(3)"]),
        script.Stage("compile", [sys.executable, "-c", "print('never')"], needs=("synth",)),
        script.Stage("env", [sys.executable, "-c", "import time; time.sleep(5)"], cap_s=0.5),
        script.Stage("roofline", [sys.executable, "-c", "print('late')"]),
    ])
    summary = script.run_plan(plan, dry_run=False)
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["synth"] == "failed" and status["compile"] == "skipped" and status["env"] == "timeout"
    assert status["roofline"] in ("ok", "skipped")  # ok unless the budget's last 20 s were reached
    assert json.loads((tmp_path / "summary.json").read_text())["stages"][1]["tail"] == "needs ['synth']"


def test_measurement_loops_on_the_cpu_executor(script: ModuleType, tiny_hf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.loader import load_model

    executor = load_model(str(compile_model(tiny_hf, tmp_path / "art", CompileOptions()))).executor
    executor.init_cache(64)
    row = script._decode_steps(executor, batch=3, context=9, steps=4)
    assert row["batch"] == 3 and row["tok_s"] > 0 and len(row["tokens"]) == 3 and len(row["tokens"][0]) == 4 + 3
    again = script._decode_steps(executor, batch=3, context=9, steps=4)
    assert again["tokens"] == row["tokens"]  # same prompts, greedy: the agreement check can hold
    assert script._agreement(row["tokens"], again["tokens"]) == {"identical": 1.0, "mean_agreeing_prefix": 7.0,
                                                                 "length": 7}
    flipped = [[*r[:3], (r[3] + 1) % 128, *r[4:]] for r in row["tokens"]]
    assert script._agreement(row["tokens"], flipped)["mean_agreeing_prefix"] == 3.0
    prefill = script._prefill(executor, batch=2, length=20, repeat=1)
    assert prefill["tok_s"] > 0 and prefill["batch"] * prefill["length"] == 40
