"""TVM targets, toolchains and ``tvm.compile`` for the tvm target.

* ``cpu``: ``{"kind": "llvm", "mcpu": <this CPU>}`` (``--arch`` names another LLVM CPU). The
  wheel's default triple rejects ``mcpu=native``, so the host CPU is named explicitly.
* ``cuda``: a tag (``nvidia/nvidia-h100``), an alias (``h100``, ``a100``, ``rtx4090``, ``h200``) or
  an explicit ``sm_XX`` arch; plain ``cuda`` would fall back to sm_50, so an arch is required.
  Kernels are compiled to a fatbin with nvcc at build time. A machine without a driver has
  no ``libcuda.so.1`` and TVM's CUDA runtime plugin does not load, which silently turns the
  device code into CUDA source; a stub ``libcuda.so.1`` (every entry point returns
  ``CUDA_ERROR_NO_DEVICE``) is compiled once and preloaded so that the plugin loads.
* ``rocm``: ``--arch gfx942`` (``gfx90a``, ...), linked with ``ld.lld`` against the AMDGPU
  device libraries; ``scripts/setup_rocm_toolchain.sh`` unpacks both from Debian packages.

GPU targets use TVM's default Relax pipeline, which schedules every kernel with dlight
(``Matmul``, ``GEMV``, ``Reduction``, ``GeneralReduction``, ``Fallback``).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmc.compiler.errors import TargetUnavailableError, UnsupportedError
from llmc.compiler.paths import cache_dir

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "rocm")
CUDA_ALIASES = {
    "h100": "nvidia/nvidia-h100",
    "a100": "nvidia/nvidia-a100",
    "rtx4090": "nvidia/geforce-rtx-4090",
    "h200": "sm_90a",
}
CUDA_STUB_FUNCTIONS = (
    "cuInit", "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetName", "cuDeviceGetAttribute", "cuCtxGetCurrent",
    "cuFuncSetAttribute", "cuLaunchKernel", "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleGetGlobal",
    "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled", "cuDriverGetVersion",
)


# -- targets ---------------------------------------------------------------------------------
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. ``znver3``)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def target_spec(device: str, arch: str | None) -> dict[str, Any]:
    """The JSON target description for ``device`` (checked), recorded in the manifest."""
    if device == "cpu":
        cpu = arch or host_cpu()
        return {"kind": "llvm", "mcpu": cpu, "num-cores": max(1, os.cpu_count() or 1)}
    if device == "cuda":
        if not arch:
            raise UnsupportedError(
                "--device cuda needs --arch: a tag such as nvidia/nvidia-h100, an alias "
                f"({', '.join(CUDA_ALIASES)}) or an sm_XX architecture; plain cuda would build for sm_50"
            )
        arch = CUDA_ALIASES.get(arch.lower(), arch)
        if arch.startswith("nvidia/"):
            return {"tag": arch}
        if not arch.startswith("sm_") or not arch[3:5].isdigit():
            raise UnsupportedError(f"unknown CUDA architecture {arch!r}; use e.g. sm_90a, sm_80 or nvidia/nvidia-h100")
        return {"kind": "cuda", "arch": arch}
    if device == "rocm":
        if not arch or not arch.startswith("gfx"):
            raise UnsupportedError(f"--device rocm needs --arch gfxNNN (e.g. gfx942, gfx90a), got {arch!r}")
        return {"kind": "rocm", "mcpu": arch, "mtriple": "amdgcn-amd-amdhsa-hcc"}
    raise UnsupportedError(f"the tvm target builds for devices {', '.join(DEVICES)}, not {device!r}")


def make_target(spec: dict[str, Any]) -> Any:
    from tvm.target import Target

    if "tag" in spec:
        return Target(spec["tag"])
    return Target(dict(spec))


def device_kind(spec: dict[str, Any]) -> str:
    if "tag" in spec:
        return "cuda"
    return {"llvm": "cpu", "cuda": "cuda", "rocm": "rocm"}[spec["kind"]]


# -- toolchains ------------------------------------------------------------------------------
@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_toolkit() -> Path:
    """The CUDA toolkit root holding ``bin/nvcc`` and ``include/cuda_runtime.h``."""
    candidates = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # a wrapper script (``exec /path/to/nvcc "$@"``) hides the real prefix
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for word in Path(nvcc).read_text(errors="strict")[:4096].split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    raise TargetUnavailableError(
        "the CUDA toolkit (nvcc and its headers) was not found; set CUDA_PATH to its root",
    )


def _build_cuda_stub() -> Path:
    out = cache_dir() / "tvm" / "cuda-stub" / "libcuda.so.1"
    if out.exists():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise TargetUnavailableError("no C compiler (cc) to build the libcuda stub needed to embed CUDA binaries")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["/* llmc: libcuda.so.1 stub for build machines without a GPU driver; never runs kernels. */",
             'static const char *msg = "CUDA_ERROR_NO_DEVICE (llmc build stub: no driver)";',
             "int cuGetErrorName(int e, const char **s) { *s = msg; return 0; }",
             "int cuGetErrorString(int e, const char **s) { *s = msg; return 0; }"]
    lines += [f"int {name}(void) {{ return 100; }}" for name in CUDA_STUB_FUNCTIONS]
    src = out.with_suffix(".c")
    src.write_text("\n".join(lines) + "\n")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    proc = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TargetUnavailableError(f"building the libcuda stub failed: {proc.stderr.strip()[:500]}")
    os.replace(tmp, out)
    return out


CUDART = "libcudart.so.13"  # what the wheel's libtvm_runtime_cuda.so links against


def _find_cudart(toolkit: Path | None) -> Path | str:
    """``libcudart.so.13``: already loadable, from an ``nvidia-cuda-runtime`` wheel, or in ``toolkit``."""
    with contextlib.suppress(OSError):
        ctypes.CDLL(CUDART)
        return CUDART
    import sys

    roots = [Path(p) / "nvidia" for p in sys.path if p]
    hits = [h for r in roots if r.is_dir() for h in sorted(r.glob(f"*/lib/{CUDART}"))]
    if toolkit is not None:
        subs = ("lib64", "lib", "targets/x86_64-linux/lib")
        hits += [h for sub in subs for h in sorted((toolkit / sub).glob(CUDART))]
    if hits:
        return hits[0]
    raise TargetUnavailableError(f"{CUDART} (the CUDA 13 runtime TVM's CUDA plugin needs) was not found",
                                 hint="pip install nvidia-cuda-runtime, or set CUDA_PATH to a CUDA 13 toolkit")


def _load_cuda_plugin(cudart: Path | str) -> None:
    """Load TVM's CUDA runtime plugin (``libtvm_runtime_cuda.so``) with ``cudart`` preloaded.

    The full wheel loads it when ``libcuda.so.1`` exists; a runtime-only TVM never does.
    """
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as exc:
        raise TargetUnavailableError(f"TVM's CUDA runtime plugin does not load: {exc}") from exc
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        raise TargetUnavailableError("TVM's CUDA runtime plugin loaded but registered no CUDA device API")


def ensure_cuda_codegen() -> tuple[Path, list[str]]:
    """Make TVM's CUDA plugin loadable so that kernels are compiled to binaries at build time.

    Returns the CUDA toolkit root and notes for the manifest.
    """
    import tvm

    toolkit = cuda_toolkit()
    notes: list[str] = []
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        cudart = _find_cudart(toolkit)
        if _find_libcuda() is None:
            ctypes.CDLL(str(_build_cuda_stub()), mode=ctypes.RTLD_GLOBAL)
            notes.append("built without a GPU driver: a stub libcuda.so.1 let TVM's CUDA plugin load")
        _load_cuda_plugin(cudart)
    return toolkit, notes


def ensure_cuda_runtime() -> None:
    """Make TVM's CUDA device API available to run an artifact (a real NVIDIA driver is needed)."""
    import tvm

    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    if _find_libcuda() is None:
        raise TargetUnavailableError("this tvm artifact is for CUDA and no NVIDIA driver (libcuda.so.1) is "
                                     "installed here")
    toolkit = None
    with contextlib.suppress(TargetUnavailableError):
        toolkit = cuda_toolkit()
    _load_cuda_plugin(_find_cudart(toolkit))


def _find_libcuda() -> str | None:
    """A real ``libcuda.so.1`` the dynamic loader can open, if any."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return "libcuda.so.1"


def rocm_toolchain() -> tuple[Path, Path]:
    """(ROCM_PATH holding ``amdgcn/bitcode``, directory holding ``ld.lld``) or a clear error."""
    roots = [os.environ.get("LLMC_ROCM_TOOLCHAIN"), str(cache_dir() / "rocm-toolchain")]
    for root in filter(None, roots):
        lib = Path(root) / "root" / "usr" / "lib" / "x86_64-linux-gnu"
        lld = Path(root) / "bin" / "ld.lld"
        if (lib / "amdgcn" / "bitcode").is_dir() and lld.exists():
            return lib, lld.parent
    rocm = os.environ.get("ROCM_PATH") or "/opt/rocm"
    lld = shutil.which("ld.lld") or (shutil.which("ld.lld", path=f"{rocm}/llvm/bin"))
    if (Path(rocm) / "amdgcn" / "bitcode").is_dir() and lld:
        return Path(rocm), Path(lld).parent
    raise TargetUnavailableError(
        "no ROCm device libraries and ld.lld found",
        hint="run scripts/setup_rocm_toolchain.sh (unpacks Debian's rocm-device-libs and lld-19), "
             "or install ROCm and set ROCM_PATH",
    )


@contextlib.contextmanager
def toolchain(kind: str) -> Iterator[list[str]]:
    """Environment for compiling device code of ``kind``; yields manifest notes."""
    if kind == "cuda":
        toolkit, notes = ensure_cuda_codegen()
        path = f"{toolkit / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        with _environ(TVM_CUDA_COMPILE_MODE="nvcc", CUDA_PATH=str(toolkit), PATH=path):
            yield [*notes, f"device code: nvcc fatbin ({toolkit})"]
    elif kind == "rocm":
        rocm_path, lld_dir = rocm_toolchain()
        path = f"{lld_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        with _environ(ROCM_PATH=str(rocm_path), PATH=path):
            yield [f"device code: AMDGPU code object linked with {lld_dir / 'ld.lld'}, bitcode from {rocm_path}"]
    else:
        yield []


# -- compile ---------------------------------------------------------------------------------
def compile_module(mod: Any, spec: dict[str, Any], cpu_schedule: str = "gemv",
                   cuda_graph: bool = False) -> tuple[Any, list[str]]:
    """``tvm.compile`` ``mod`` for ``spec`` without tuning (:func:`compile_tuned_module` tunes);
    ``cuda_graph`` turns on TVM's CUDA-graph capture of static-shape kernel sequences."""
    import tvm

    target = make_target(spec)
    kind = device_kind(spec)
    with toolchain(kind) as notes, target:
        try:
            if kind == "cpu" and cpu_schedule in ("dlight", "gemv"):
                done: dict[str, list[str]] = {}
                exe = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, cpu_schedule, done))
                if cpu_schedule == "gemv":
                    gemv, tiled = len(done.get("gemv", [])), len(done.get("token_matmul", []))
                    notes = [*notes, f"gemv schedule (untuned) on {gemv} decode_b1 kernels",
                             f"token-tiled matmul schedule on {tiled} prefill/decode kernels"]
                return exe, notes
            if cuda_graph:
                current = tvm.transform.PassContext.current()
                config = {**dict(current.config), "relax.backend.use_cuda_graph": True}
                with tvm.transform.PassContext(opt_level=current.opt_level, config=config):
                    exe = tvm.compile(mod, target=target)
                return exe, [*notes, "cuda graphs: static-shape kernel runs captured (RewriteCUDAGraph)"]
            return tvm.compile(mod, target=target), notes
        except Exception as exc:  # TVM raises many types; name the target and keep the cause
            raise UnsupportedError(f"tvm.compile for {spec} failed: {str(exc).strip().splitlines()[-1]}") from exc


def cpu_pipeline(target: Any, schedule: str = "dlight", record: dict[str, list[str]] | None = None) -> Any:
    """TVM's CPU pipeline with llmc's schedules (``gemv``) or dlight's CPU rules (``dlight``)."""
    from llmc.targets.tvm.schedules import cpu_pipeline as pipeline

    return pipeline(target, schedule, record=record)


TUNER_VERSION = 3
"""Part of the tuning-log key: logs of an older llmc tuner (other tasks, unfused kernels) are not reused."""


def tuning_dir(spec: dict[str, Any], tune_key: str, trials: int) -> Path:
    import tvm

    digest = hashlib.sha256(json.dumps([spec, tvm.__version__, tune_key, trials], sort_keys=True).encode())
    return cache_dir() / "tvm" / "tuning" / digest.hexdigest()[:16]


def compile_tuned_module(mod: Any, spec: dict[str, Any], trials: int, tune_key: str,
                         cpu_schedule: str = "gemv") -> tuple[Any, list[str], dict[str, Any]]:
    """Tune ``decode_b1``'s kernels with meta-schedule (log cached by key), then compile with the records.

    Returns the executable, manifest notes and a summary of the tuning (tasks, records, kernels
    built from them, seconds, log directory). CPU (llvm) only: tuning measures on this machine.
    """
    from llmc.targets.tvm.tune import compile_tuned

    if device_kind(spec) != "cpu":
        raise UnsupportedError("meta-schedule tuning measures on this machine: it tunes cpu (llvm) builds only")
    target = make_target(spec)
    work = tuning_dir({"target": str(target), "tuner": TUNER_VERSION}, tune_key, trials)
    with target:
        exe, report = compile_tuned(mod, target, trials, work, cpu_schedule)
    summary = {"trials": trials, "log": str(work), "reused": report.reused, "seconds": round(report.seconds, 1),
               "tasks": report.tasks, "records": report.records, "applied": report.applied,
               "untuned_gemv": report.untuned_gemv}
    return exe, report.notes, summary
