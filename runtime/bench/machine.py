"""What a benchmark ran on: CPU, memory, software versions, load, and memory bandwidth."""

from __future__ import annotations

import itertools
import os
import platform
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

import numpy as np

from llmc.compiler.version import __version__

SOFTWARE = ("numpy", "torch", "onnxruntime", "onnxruntime-genai", "transformers", "llama-cpp-python", "apache-tvm",
            "gguf", "safetensors", "tokenizers")
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in _CPU_FLAGS if f in flags]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and the load average now (the machine may be shared)."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": None,
        "memory_bytes": None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_bytes"] = int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def software_info() -> dict[str, str | None]:
    """Versions of llmc and of the libraries that do the work (None: not installed)."""
    versions: dict[str, str | None] = {"llmc": __version__}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux's ``VmHWM`` when available: ``ru_maxrss`` carries a parent's peak over fork + exec, so
    a benchmark worker started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * 1024


def current_rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def measure_bandwidth(threads: int = 1, mib: int = 256, repeats: int = 5, device: str | None = None) -> dict[str, Any]:
    """Memory bandwidth from copying a ``mib`` MiB array: (bytes read + written) / best time.

    The copy is split over ``threads`` threads (numpy releases the GIL while copying); on a
    ``cuda`` device it is one device-to-device copy timed with CUDA events."""
    if device and device.startswith("cuda"):
        return _measure_gpu_bandwidth(device, mib, repeats)
    threads = max(1, threads)
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in itertools.pairwise(bounds)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):  # the first pass faults the destination pages in
            start = time.perf_counter()
            list(pool.map(lambda p: np.copyto(p[0], p[1]), parts))
            best = min(best, time.perf_counter() - start)
    return {
        "bytes_per_s": 2 * src.nbytes / best,
        "method": f"numpy copy of {mib} MiB float64 over {threads} thread(s), best of {repeats + 1}",
        "threads": threads,
    }


def _measure_gpu_bandwidth(device: str, mib: int, repeats: int) -> dict[str, Any]:
    import torch

    n = max(mib, 1024) * 2**20 // 4  # at least 1 GiB, far beyond any GPU's L2
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    size = src.numel() * 4
    del src, dst
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # the probe's buffers are not the model's
    return {
        "bytes_per_s": 2 * size / best,
        "method": f"torch device-to-device copy of {size >> 20} MiB on "
                  f"{torch.cuda.get_device_name(device)}, CUDA events, best of {repeats + 1}",
        "threads": 1,
    }
