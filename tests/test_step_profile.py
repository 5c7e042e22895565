"""benchmarks/step_profile.py times the native step's ops by step kind on a real engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from llmc.targets.torch import qkernels
from tests.helpers import load_script
from tests.models import write_random_hf_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_profile.py"


def _script() -> ModuleType:
    return load_script(SCRIPT, "llmc_step_profile")


def test_profile_splits_prompt_and_decode_steps(tmp_path: Path) -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")
    from llmc.driver import CompileOptions, compile_model

    hf = tmp_path / "hf"
    hf.mkdir()
    write_random_hf_model(hf, seed=3, vocab_size=99)
    artifact = compile_model(hf, tmp_path / "artifact", CompileOptions(quant="int8"))  # native steps need blocks
    out = tmp_path / "profile.json"
    assert _script().main([str(artifact), "--seqs", "3", "--prompt-len", "20", "--gen-len", "4", "--threads", "2",
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    kinds = report["kinds"]
    decode, prompt = kinds["decode"], kinds["prompt"]
    # 3 fresh 20-token prompts (60 rows) and 3 more tokens each (the first comes from the prompt's step):
    # 69 rows in all, a decode step at most one row per sequence (a prompt step may hold decode rows too)
    assert prompt["rows"] + decode["rows"] == 3 * 20 + 3 * 3
    assert prompt["rows"] >= 60 and decode["steps"] >= 1 and decode["rows"] <= 3 * decode["steps"]
    for row in (decode, prompt):
        ops = row["ops_ms_per_step"]
        assert ops["linear"] > 0 and ops["attention"] > 0
        assert sum(ops.values()) <= row["wall_ms_per_step"] * 1.01  # the ops are inside the step's call
    pool = report["pool"]  # two threads: the steps ran on the pool, some pieces maybe twice (preempted)
    assert pool["pieces"] > 0 and 0 <= pool["repeated"] <= pool["pieces"]
