"""llmc's C++ CPU kernel for group-quantized weights x a few float32 rows (decode GEMV/GEMM).

The extension (``csrc/qgemv.cpp``) reads llmc's packed layout directly (4/8-bit codes, per-group
scales, optional offsets), widening codes to float in registers: no float weight is materialized.
It is built on first use with ``torch.utils.cpp_extension.load`` (``-O3 -march=native -fopenmp``,
needs a C++ compiler and ninja) and cached per machine under ``<llmc cache>/torch_extensions``.
If the build fails, or ``LLMC_NO_CPU_KERNELS=1``, :func:`available` is False (one warning is
logged) and callers keep dequantizing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from llmc.compiler.locks import file_lock
from llmc.compiler.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "qgemv.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def _cpu_fingerprint() -> str:
    """CPU model and flags: a ``-march=native`` build is only reused on the same kind of CPU."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return text


def build_dir() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else ``<llmc cache>/torch_extensions``."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return cache_dir() / "torch_extensions"


def _extension_name() -> str:
    """A build directory per source, flags, CPU, torch and checkout: the source's path is in ninja's
    build command, so two checkouts sharing one directory would rebuild it in turn (under torch's lock)."""
    key = (SOURCE.read_bytes() + " ".join(CFLAGS).encode() + _cpu_fingerprint().encode() + torch.__version__.encode()
           + str(SOURCE.resolve()).encode())
    return "llmc_qgemv_" + hashlib.sha256(key).hexdigest()[:12]


def disabled() -> bool:
    """True when ``LLMC_NO_CPU_KERNELS`` is set to a non-empty value other than ``0``."""
    return os.environ.get("LLMC_NO_CPU_KERNELS", "") not in ("", "0")


def load() -> ModuleType | None:
    """The compiled extension (building it on first use), or None if disabled or the build failed."""
    global _module, _failed
    if disabled():
        return None
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils import cpp_extension

                name = _extension_name()
                directory = build_dir() / name
                directory.mkdir(parents=True, exist_ok=True)
                with _builder_lock(directory):
                    _module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS,
                                                 extra_ldflags=LDFLAGS, build_directory=str(directory),
                                                 verbose=False)
            except Exception as exc:  # no compiler, no ninja, unsupported flags: keep dequantizing
                _failed = True
                log.warning("llmc CPU quantized kernels unavailable (%s: %s); dequantizing per call instead",
                            type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    return _module


STALE_LOCK_SECONDS = 600.0
"""torch's build lock older than this is a dead builder's (a build of the kernel takes well under a minute)."""


@contextlib.contextmanager
def _builder_lock(directory: Path) -> Iterator[None]:
    """One builder at a time, and no wait forever on a dead one. torch's own lock (a ``lock`` file)
    stays behind when a build is killed, and every later load then waits on it forever. llmc's
    builders take turns on an flock (released by the kernel when its holder dies); the holder then
    waits for torch's file to go (a builder that does not take the flock, e.g. an older llmc) and
    removes it once it is older than :data:`STALE_LOCK_SECONDS`."""
    torch_lock = directory / "lock"
    with file_lock(directory / "llmc-build.lock", waiting="waiting for another llmc process building the CPU kernels"):
        while True:
            try:
                age = time.time() - torch_lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age > STALE_LOCK_SECONDS:
                log.warning("removing %s, left by a build that did not finish", torch_lock)
                torch_lock.unlink(missing_ok=True)
                break
            time.sleep(0.5)
        yield


def available() -> bool:
    """Whether :func:`qgemv` can run here (builds the extension on the first call)."""
    return load() is not None


def qgemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
          bits: int, group: int, out: int) -> torch.Tensor:
    """``x @ w.T`` for float32 ``x [rows, in]`` and an llmc group-quantized ``w [out, in]``.

    ``codes`` uint8 ``[out, in]`` (8-bit) or ``[out, in // 2]`` (4-bit, low nibble first);
    ``scales``/``offsets`` float32 ``[out, ceil(in / group)]``; ``offsets`` None when symmetric
    (``w = s * (q - 2**(bits-1))``), else ``w = s * q + offset``. Raises RuntimeError if unavailable.
    """
    module = load()
    if module is None:
        raise RuntimeError("llmc CPU quantized kernels are unavailable (see the logged warning)")
    return module.qgemv(x, codes, scales, offsets, int(bits), int(group), int(out))
