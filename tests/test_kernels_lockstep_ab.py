"""benchmarks/kernels_lockstep_ab.py: two children on one build take turns and report the same bits
(a harness that compared different inputs, or timed nothing, would fail here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.targets.torch import qkernels

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_lockstep_ab.py"


@pytest.fixture(scope="module")
def build() -> str:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")
    where = subprocess.run([sys.executable, str(SCRIPT), "where"], capture_output=True, text=True, check=True)
    folder = where.stdout.strip().splitlines()[-1]
    assert Path(folder).is_dir() and Path(folder).name == qkernels.extension_name()
    return folder


@pytest.mark.parametrize("workload", [["gemm", "--case", "q6_k", "--rows", "3", "--count", "2"],
                                      ["attention", "--cache", "same", "--ctx", "20"],
                                      ["attention", "--cache", "same", "--prompt", "20", "--seqs", "2"]],
                         ids=lambda w: "-".join(w[:1] + w[3:4]))
def test_one_build_against_itself_gives_the_same_bits(build: str, workload: list[str]) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), workload[0], build, build, *workload[1:], "--steps", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    match = re.search(r"A ([0-9.]+) ms, B ([0-9.]+) ms, B/A per turn: median ([0-9.]+) .* same bits: (\w+)", line)
    assert match is not None, line
    a_ms, b_ms, ratio = (float(match.group(i)) for i in (1, 2, 3))
    assert a_ms > 0 and b_ms > 0 and ratio > 0 and match.group(4) == "True", line


def test_a_folder_without_a_build_is_refused(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "gemm", str(tmp_path), str(tmp_path), "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "no built llmc kernels" in run.stderr or "failed to start" in run.stderr + run.stdout


def _contenders() -> list[str]:
    """Processes running the harness's competing busy loop (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "busy, period = float(sys.argv[1])" in text:
            found.append(cmdline.parent.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="looks for the competitor in /proc (Linux)")
def test_a_competing_load_runs_beside_the_turns_and_ends_with_them(build: str) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "gemm", build, build, "--case", "q8_0", "--rows", "2",
                          "--count", "1", "--steps", "3", "--contend", "0.3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "same bits: True" in run.stdout.strip().splitlines()[-1]
    assert _contenders() == []
