"""A build of the CPU kernels killed midway must not make every later load wait forever (torch's
``lock`` file stays behind; llmc removes it when it is older than any build takes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmc.targets.torch import qkernels


def test_a_stale_torch_lock_does_not_hang_the_next_load() -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc's CPU kernels cannot be built here")
    directory = qkernels.build_dir() / qkernels._extension_name()
    lock = directory / "lock"
    lock.touch()  # what a SIGKILLed build leaves, long ago
    old = lock.stat().st_mtime - qkernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    code = "from llmc.targets.torch import qkernels; assert qkernels.available()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (directory / "lock").exists()
