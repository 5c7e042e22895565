"""A build of the CPU kernels killed midway must not make every later load wait forever (torch's
``lock`` file stays behind; llmc removes it when it is older than any build takes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc.targets.torch import qkernels


def _stale_lock(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    lock.touch()  # what a SIGKILLed build leaves, long ago
    old = lock.stat().st_mtime - qkernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    return lock


def test_a_stale_torch_lock_does_not_hang_the_next_load() -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc's CPU kernels cannot be built here")
    lock = _stale_lock(qkernels.build_dir() / qkernels.extension_name())
    code = "from llmc.targets.torch import qkernels; assert qkernels.available()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr  # a built library loads without touching torch's lock
    lock.unlink(missing_ok=True)


def test_a_build_removes_a_stale_torch_lock_first(monkeypatch, tmp_path: Path) -> None:
    from torch.utils import cpp_extension

    directory = tmp_path / "llmc_qk_test"
    lock = _stale_lock(directory)
    seen: list[bool] = []

    def fake_load(name: str, build_directory: str, **kwargs: object) -> str:
        seen.append(lock.exists())
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "built"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert qkernels._build("llmc_qk_test", directory) == "built" and seen == [False]


def test_a_build_leaves_the_extension_name_as_it_was(monkeypatch, tmp_path: Path) -> None:
    """torch's ``cpp_extension.load`` appends its libraries to the flag lists it is given; the name (a
    hash of the flags too) must not change in the process that built, or that process would look for
    its kernels in another folder than every other process (kernels_lockstep_ab.py `where` did)."""
    from torch.utils import cpp_extension

    def fake_load(name: str, build_directory: str, extra_cflags: list[str], extra_ldflags: list[str],
                  **kwargs: object) -> str:
        extra_cflags.append("-DTORCH_WAS_HERE")
        extra_ldflags += ["-ltorch", "-lc10"]  # what torch 2.13 does
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "built"

    name = qkernels.extension_name()
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert qkernels._build("llmc_qk_test", tmp_path / "llmc_qk_test") == "built"
    assert qkernels.extension_name() == name
