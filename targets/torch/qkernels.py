"""llmc's C++ CPU kernels: quantized weights x int8-quantized activations (any row count).

The extension (``csrc/qk_*.cpp``) keeps each quantized weight in a kernel layout
(:class:`KernelWeight`: 16 interleaved rows per tile, codes of 4 or 8 bits, a scale and offset per
16 or 32 inputs) that holds every GGUF block type llmc runs and llmc's own int4/int8 groups
exactly. A matmul quantizes the activations once per call to int8 in blocks of 32 (as llama.cpp
does) and computes exact integer dot products: AMX-INT8 tile multiplies (``tdpbssd``/``tdpbsud``, for groups
of 16 rows and more; the OS must grant the tile state), AVX-512 VNNI (``vpdpbusd``), AVX-VNNI (the
same instruction on 256 bits: Intel cores without AVX-512), AVX2 (``vpmaddubsw``/``vpmaddwd``) or
portable C++, chosen at run time from the CPU's features (the build never assumes the CPU it runs
on: the cached library is valid on any x86-64). All the paths give identical results.
``LLMC_CPU_ISA=scalar|avx2|avxvnni|avx512|amx`` (or :func:`use_isa`) forces one.

Error bound of the int8 activations, per output: each activation block of 32 values is rounded
to ``d * q`` with ``d = max|x| / 127``, an error of at most ``d / 2`` per value, so an output
moves by at most ``sum_blocks d_b / 2 * sum_{i in b} |w_i|`` (plus float32 rounding) from the
float product; tests check that bound on every path.

The extension is built on first use with ``torch.utils.cpp_extension`` (needs g++ and ninja;
about 20 s, announced on stderr) into ``<llmc cache>/torch_extensions/llmc_qk_<hash>``: keyed by
the sources' content, compiler flags and torch version, built from a copy of the sources in that
folder (so every checkout with the same sources shares one build, and ninja's commands, which
hold the source paths, are the same for all of them), under a file lock (two processes never
build at once; a killed builder's lock goes with it). If the build fails, or
``LLMC_NO_CPU_KERNELS=1``, :func:`available` is False (one warning is logged) and callers
dequantize instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from llmc.compiler.locks import file_lock
from llmc.compiler.paths import cache_dir
from llmc.compiler.progress import message

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("qk_binding.cpp", "qk_pool.cpp", "qk_program.cpp", "qk_scalar.cpp", "qk_avx2.cpp", "qk_avxvnni.cpp",
           "qk_avx512.cpp", "qk_amx.cpp")
HEADERS = ("qk_common.h", "qk_avx2_gemm.h", "qk_avx512_codes.h", "qk_ops.h", "qk_pool.h", "qk_program.h")
CFLAGS = ("-O3", "-fopenmp", "-DNDEBUG", "-ffp-contract=off", "-fno-math-errno")
"""No ``-march``: ISA-specific code is compiled per function (``#pragma GCC target``) and chosen at
run time, and ``-ffp-contract=off`` keeps every path's float arithmetic identical."""
LDFLAGS = ("-fopenmp",)
"""Tuples: torch's ``cpp_extension.load`` appends its libraries to the lists it is given, which would
change :func:`extension_name` in the process that built the kernels."""

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


def build_dir() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else ``<llmc cache>/torch_extensions``."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return cache_dir() / "torch_extensions"


def _source_files() -> list[Path]:
    return [CSRC / name for name in (*SOURCES, *HEADERS)]


def extension_name() -> str:
    """``llmc_qk_<hash>`` of the sources' content, the flags and the torch/Python versions."""
    digest = hashlib.sha256()
    for path in _source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(" ".join(CFLAGS + LDFLAGS).encode() + torch.__version__.encode() + sys.version.encode())
    return "llmc_qk_" + digest.hexdigest()[:16]


def disabled() -> bool:
    """True when ``LLMC_NO_CPU_KERNELS`` is set to a non-empty value other than ``0``."""
    return os.environ.get("LLMC_NO_CPU_KERNELS", "") not in ("", "0")


def _built_library(directory: Path, name: str) -> Path | None:
    found = [p for p in directory.glob(f"{name}*.so") if p.is_file()] if directory.is_dir() else []
    return found[0] if found else None


STALE_LOCK_SECONDS = 600.0
"""torch's build lock older than this is a dead builder's (a build of the kernels takes about a minute)."""


def _remove_stale_torch_lock(directory: Path) -> None:
    """torch's own lock file (``lock``) stays behind when a build is killed, and every later load would
    wait on it forever. Under llmc's lock, wait for it to go (a builder that does not take llmc's lock,
    e.g. an older llmc) and remove it once it is older than :data:`STALE_LOCK_SECONDS`."""
    torch_lock = directory / "lock"
    while True:
        try:
            age = time.time() - torch_lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            log.warning("removing %s, left by a build that did not finish", torch_lock)
            torch_lock.unlink(missing_ok=True)
            return
        time.sleep(0.5)


def _announce(text: str) -> None:
    message(text)
    sys.stderr.write(f"llmc: {text}\n")
    sys.stderr.flush()


def _build(name: str, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory.parent / f"{name}.lock", waiting="waiting for another llmc process building the CPU "
                   "kernels"):
        library = _built_library(directory, name)
        if library is not None:
            return cpp_extension._import_module_from_library(name, str(directory), True)
        _remove_stale_torch_lock(directory)
        src = directory / "src"
        src.mkdir(exist_ok=True)
        for path in _source_files():
            shutil.copyfile(path, src / path.name)
        _announce(f"building CPU kernels, once, ~20 s (cached in {directory})")
        start = time.perf_counter()
        module = cpp_extension.load(name=name, sources=[str(src / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                                    extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)
        _announce(f"CPU kernels built in {time.perf_counter() - start:.0f} s")
        return module


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
                name = extension_name()
                directory = build_dir() / name
                if _built_library(directory, name) is not None:
                    from torch.utils import cpp_extension

                    _module = cpp_extension._import_module_from_library(name, str(directory), True)
                else:
                    _module = _build(name, directory)
            except Exception as exc:  # no compiler, no ninja, unsupported flags: keep dequantizing
                _failed = True
                text = str(exc).strip()
                log.warning("llmc CPU quantized kernels unavailable (%s: %s); dequantizing per call instead",
                            type(exc).__name__, text.splitlines()[-1] if text else "")
    return _module


def load_from(directory: str | Path) -> ModuleType:
    """Make the kernels already built in ``directory`` (a ``llmc_qk_<hash>`` folder of
    :func:`build_dir`, e.g. an earlier checkout's build) this process's kernels: benchmarks that set two
    builds side by side run one per process. Call it before anything else loads the kernels."""
    global _module
    from torch.utils import cpp_extension

    folder = Path(directory).resolve()
    if _built_library(folder, folder.name) is None:
        raise FileNotFoundError(f"no built llmc kernels ({folder.name}*.so) in {folder}")
    with _lock:
        if _module is not None:
            if Path(str(_module.__file__)).resolve().parent != folder:
                raise RuntimeError(f"the kernels of {Path(str(_module.__file__)).parent} are loaded already")
            return _module
        _module = cpp_extension._import_module_from_library(folder.name, str(folder), True)
    return _module


def available() -> bool:
    """Whether the kernels can run here (builds the extension on the first call)."""
    return load() is not None


def _module_or_raise() -> ModuleType:
    module = load()
    if module is None:
        raise RuntimeError("llmc CPU quantized kernels are unavailable (see the logged warning)")
    return module


def isa_paths() -> list[str]:
    """The kernel paths this CPU runs, best first (of ``amx``, ``avx512``, ``avxvnni``, ``avx2``, ``scalar``)."""
    return list(_module_or_raise().isa_paths())


def current_isa() -> str:
    """The path matmuls use now."""
    return str(_module_or_raise().current_isa())


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernels on path ``name`` inside the block (ValueError if this CPU lacks it)."""
    module = _module_or_raise()
    previous = os.environ.get("LLMC_CPU_ISA", "")
    module.set_isa(name)
    try:
        yield
    finally:
        module.set_isa(previous)


@contextlib.contextmanager
def steal_patience(ns: int) -> Iterator[None]:
    """Inside the block, a native step's idle thread computes a piece another thread holds once that piece has
    run ``ns`` nanoseconds (0: at once, so that pieces are computed twice and their commits race: for tests)."""
    module = _module_or_raise()
    module.set_steal_patience_ns(int(ns))
    try:
        yield
    finally:
        module.set_steal_patience_ns(-1)


def pool_counts() -> tuple[int, int]:
    """(pieces run, pieces an idle thread computed again) by native steps on more than one thread, in this
    process: a piece is computed again when the thread that took it held it past the patience (preempted)."""
    pieces, repeated = _module_or_raise().pool_counts()
    return int(pieces), int(repeated)


def kernel_weight(codes: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor,
                  offsets: np.ndarray | torch.Tensor | None, group: int, zero: int, max_code: int) -> Any:
    """A :class:`KernelWeight` for ``value = scale * (u - zero)`` (``offsets`` None) or
    ``scale * u + offset``: ``codes`` uint8 ``[out, in]``, ``scales``/``offsets`` ``[out, ceil(in / group)]``
    float16 (kept as such) or another float type (float32); ``group`` as :func:`kernel_group_ok` takes."""
    as_tensor = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    scales_t = as_tensor(scales)
    if scales_t.dtype == torch.bfloat16:
        scales_t = scales_t.float()
    return _module_or_raise().KernelWeight(as_tensor(codes), scales_t, None if offsets is None else as_tensor(offsets),
                                           int(group), int(zero), int(max_code))


def kernel_group_ok(group: int, in_features: int) -> bool:
    """Whether :func:`kernel_weight` takes scales per ``group`` inputs (16, a multiple of 32, or one
    group per row) for rows of ``in_features``."""
    return group == 16 or (group > 0 and (group % 32 == 0 or group >= in_features))


def quantize_activations(x: torch.Tensor, isa: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test hook: ``x [rows, in]`` as the kernels quantize it: int8 values ``[rows, blocks, 32]``,
    block scales ``d`` and sums ``s`` ``[rows, blocks]``."""
    packed = _module_or_raise().quantize_activations(x, isa).numpy()
    return packed[..., :32], packed[..., 32], packed[..., 33]
