"""The tvm target: emits an exported TVM library (``target/tvm/model.so``) plus its feed plan.

Options (``CompileOptions.target_options`` / ``llmc compile --arch --tune``): ``device``
(``cpu``, ``cuda``, ``rocm``), ``arch`` (the LLVM CPU, CUDA tag/arch or AMD gfx arch), ``tune``
(meta-schedule trials over the batch-1 decode's matrix-vector kernels, cpu only, see
:mod:`llmc.targets.tvm.tune`; 0 = TVM's default schedules), ``page_size`` (KV cache page, 16),
``cpu_schedule`` (``gemv``, the default: llmc's GEMV schedule for the batch-1 decode's matmuls
with fixed choices, no tuning, see :mod:`llmc.targets.tvm.schedules`; ``dlight``: dlight's CPU
GEMV/reduction rules, with minutes of LLVM codegen for their unrolling; ``tvm``: TVM's own CPU
pipeline, which leaves kernels unscheduled, 4.4x slower decode on SmolLM2),
``decode_buckets`` (the batch sizes that get a static decode function ``decode_b{N}``, comma
separated; the executor pads a decode batch up to the smallest bucket that holds it; default
1,2,4,...,256 for cuda, 1 for cpu and rocm), ``cuda_graph`` (cuda only, default on: TVM's
RewriteCUDAGraph captures each bucket's whole decode step, attention over the paged cache
included, as one CUDA graph; ``--target-option cuda_graph=0`` turns it off).
"""

from __future__ import annotations

import importlib.util
import json
import time
from typing import TYPE_CHECKING, Any

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor
from llmc.runtime.target import Capabilities, EmitResult, Target, TargetOption, lowered_ops
from llmc.targets.tvm.graphs import graph_coverage
from llmc.targets.tvm.model import bucket_name
from llmc.targets.tvm.schedules import CPU_SCHEDULES

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

LIBRARY = "target/tvm/model.so"
PAYLOAD = "target/tvm/tvm.json"
PAGE_SIZE = 16
CUDA_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Decode batch buckets of CUDA builds (each a static function captured as one CUDA graph)."""
MAX_BUCKET = 1024


class TvmTarget(Target):
    name = "tvm"
    doc = "Apache TVM Relax over TVM's paged KV cache: llvm (CPU) runs here; cuda and rocm cross-compile"
    compile_options = (
        TargetOption("arch", str, "LLVM CPU name, CUDA tag/arch or AMD gfx arch (--arch)", optional=True),
        TargetOption("tune", int, "meta-schedule trials, cpu builds only (--tune)", minimum=0),
        TargetOption("page_size", int, "KV cache page size in tokens (16)", minimum=1),
        TargetOption("cpu_schedule", str, "schedule of cpu builds' matmuls", CPU_SCHEDULES, optional=True),
        TargetOption("decode_buckets", str, "batch sizes with a static decode function, e.g. 1,2,4,8 "
                     "(default 1,2,...,256 for cuda, 1 otherwise)", optional=True),
        TargetOption("cuda_graph", bool, "capture each decode bucket's step as one CUDA graph (cuda builds; "
                     "default on)"),
    )

    def capabilities(self) -> Capabilities:
        return Capabilities(ops=lowered_ops("add_rms_norm", "swiglu", "rope_attention", refused=("rope", "attention")),
                            devices=("cpu", "cuda", "rocm"), kv_layout="paged")

    def rewrites(self, opt_level: int) -> list[str]:
        """TVM's KV cache applies RoPE itself: every layer must be ``rope_attention``."""
        return ["fold-rope"]

    def availability(self) -> str | None:
        if importlib.util.find_spec("tvm") is None:
            return "apache-tvm is not installed (pip install 'llmc-toolchain[tvm]')"
        return None

    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        from llmc.runtime.registry import require_available

        require_available(self)
        from llmc.compiler.ir.printer import print_module
        from llmc.targets.tvm import build
        from llmc.targets.tvm.lower import lower_module

        device = str(options.get("device") or "cpu")
        arch = options.get("arch")
        tune = int(options.get("tune") or 0)
        page_size = int(options.get("page_size") or PAGE_SIZE)
        spec = build.target_spec(device, arch)
        kind = build.device_kind(spec)
        if tune and kind != "cpu":
            raise UnsupportedError("--tune needs a GPU to measure on for cuda/rocm; here it tunes cpu builds only")
        cpu_schedule = options.get("cpu_schedule") or ("gemv" if kind == "cpu" else None)
        if cpu_schedule is not None and (kind != "cpu" or cpu_schedule not in CPU_SCHEDULES):
            raise UnsupportedError(f"cpu_schedule (cpu builds only) must be one of {', '.join(CPU_SCHEDULES)}, "
                                   f"not {cpu_schedule!r} for a {kind} build")
        buckets = _buckets(options.get("decode_buckets"), CUDA_BUCKETS if kind == "cuda" else (1,))
        cuda_graph = _flag("cuda_graph", options.get("cuda_graph"), default=kind == "cuda")
        if cuda_graph and kind != "cuda":
            raise UnsupportedError(f"cuda_graph is a CUDA option; this build is for {kind}")
        target = build.make_target(spec)
        start = time.perf_counter()
        lowered = lower_module(module, target, buckets, page_size)
        # the log belongs to the kernels: key it by llmc's IR and by the lowered TVM module
        # (a change in how llmc lowers an op must not reuse records of the old kernels)
        tune_key = f"{print_module(module)}\n{_script_digest(lowered.mod)}" if tune else ""
        tuning = None
        if tune:
            exe, notes, tuning = build.compile_tuned_module(lowered.mod, spec, tune, tune_key, str(cpu_schedule))
        else:
            exe, notes = build.compile_module(lowered.mod, spec, str(cpu_schedule), cuda_graph=cuda_graph)
        lib = writer.path(LIBRARY)
        exe.export_library(str(lib))
        seconds = time.perf_counter() - start
        device_code = _check_device_code(exe, lib, kind) if kind != "cpu" else None
        coverage = None
        if cuda_graph:
            graphs = graph_coverage(exe.as_text(), [bucket_name(b) for b in lowered.buckets])
            coverage = {name: cov.to_dict() for name, cov in graphs.items()}
            notes = [*notes, *(f"cuda graph of {name}: {c['captured_kernel_calls']} kernel calls in {c['graphs']} "
                               f"graph(s), {len(c['outside'])} outside ({', '.join(c['outside']) or 'none'})"
                               for name, c in coverage.items())]
        import tvm

        payload = {
            "tvm_version": tvm.__version__,
            "device": kind,
            "target": spec,
            "target_full": str(target),
            "functions": lowered.functions,
            "param_slots": [list(s) for s in lowered.param_slots],
            "page_size": page_size,
            "decode_buckets": lowered.buckets,
            "kv_dtype": lowered.kv_dtype,
            "rope": lowered.rope.to_dict(),
            "tune_trials": tune,
            "tuning": tuning,
            "cuda_graph": cuda_graph,
            "graph_coverage": coverage,
            "device_code": device_code,
            "compile_seconds": round(seconds, 2),
        }
        writer.path(PAYLOAD).write_text(json.dumps(payload, indent=1))
        opts = {"device": kind, "arch": spec.get("mcpu") or spec.get("arch") or spec.get("tag"),
                "target": spec, "tune": tune, "page_size": page_size, "cpu_schedule": cpu_schedule,
                "decode_buckets": ",".join(map(str, lowered.buckets)), "cuda_graph": cuda_graph}
        return EmitResult(options=opts, files=[LIBRARY, PAYLOAD], notes=lowered.notes + notes)

    def kv_layout(self, artifact: Artifact) -> tuple[int, int]:
        """TVM's paged cache: pages of ``page_size`` tokens in the lowered ``kv_dtype`` (the payload's)."""
        from llmc.runtime.capacity import kv_bytes_per_token

        payload = json.loads(artifact.file(PAYLOAD).read_text())
        return kv_bytes_per_token(artifact.config, str(payload["kv_dtype"])), int(payload["page_size"])

    def load(self, artifact: Artifact, **options: Any) -> Executor:
        from llmc.runtime.registry import require_available

        require_available(self)
        from llmc.targets.tvm.executor import TvmExecutor

        return TvmExecutor(artifact, device=options.get("device"), threads=options.get("threads"))


def _script_digest(mod: Any) -> str:
    """sha256 of the TVMScript of ``mod`` (the same text in every process, unlike pointer-keyed hashes)."""
    import hashlib

    return hashlib.sha256(mod.script().encode()).hexdigest()


def _buckets(value: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    """The ``decode_buckets`` option: comma-separated batch sizes (1 always included)."""
    if value is None or value == "":
        return default
    try:
        sizes = {int(part) for part in str(value).replace(" ", "").split(",") if part}
    except ValueError:
        sizes = set()
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BUCKET:
        raise UnsupportedError(f"target option decode_buckets expects batch sizes between 1 and {MAX_BUCKET} "
                               f"separated by commas (e.g. 1,2,4,8), got {value!r}")
    return tuple(sorted(sizes | {1}))


def _flag(name: str, value: Any, default: bool) -> bool:
    """A boolean target option given as a bool or as text (``--target-option cuda_graph=0``)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UnsupportedError(f"target option {name} expects a boolean (1/0, true/false), got {value!r}")


def _check_device_code(exe: Any, lib: Any, kind: str) -> dict[str, Any]:
    """Compare the kernels of the generated device source with the ELF symbols in ``lib``."""
    from llmc.targets.tvm.devcode import device_images, kernel_names

    source_kind, fmt = ("cuda", "cuda") if kind == "cuda" else ("rocm", "llvm")
    device_modules = [m for m in _walk(exe.mod) if m.kind in ("cuda", "hip")]
    if not device_modules:
        raise UnsupportedError(f"tvm.compile produced no {kind} device module")
    kernels = sorted({k for m in device_modules for k in kernel_names(m.inspect_source(fmt), source_kind)})
    images = device_images(lib)
    functions = {f for im in images for f in im.functions}
    missing = [k for k in kernels if k not in functions]
    if not kernels or not images or missing:
        raise UnsupportedError(
            f"the exported library lacks compiled {kind} code for {len(missing) or len(kernels)} of "
            f"{len(kernels)} kernels (e.g. {(missing or kernels)[:3]}); was the device code left as source?"
        )
    return {
        "machine": images[0].machine,
        "elf_flags": images[0].flags,
        "kernels": kernels,
        "binary_bytes": sum(im.size for im in images),
    }


def _walk(mod: Any) -> list[Any]:
    out = [mod]
    for imp in mod.imports:
        out.extend(_walk(imp))
    return out
