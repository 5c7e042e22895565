"""Meta-schedule tuning of the batch-1 decode kernels for the tvm target's CPU (llvm) builds.

What is tuned: the static-shape matmul kernels of ``decode_b1`` (q/k/v/o, gate/up, down,
lm_head, each with whatever TVM fused into it), taken from the module *after* TVM's
legalization and fusion, so the tuned workloads are exactly the PrimFuncs that the build
compiles (a record for an unfused matmul never matches a fused ``matmul + add`` kernel).
Kernels that llmc's GEMV schedule fits (all of them for Llama models) search its two choices
(:func:`llmc.targets.tvm.schedules.gemv_space`, replayed: the space is small); any other
static kernel searches TVM's generic CPU space with the evolutionary strategy. Candidates are
timed with the CPU caches flushed, as a decode step meets its weights. Decode kernels without a
record get the untuned GEMV schedule; dynamic-shape kernels (``prefill``, batched ``decode``)
cannot be tuned and get llmc's token-tiled matmul schedule (:mod:`llmc.targets.tvm.schedules`).

Why the stock meta-schedule setup built nothing here: its ``LocalBuilder`` starts new worker
processes for every batch and its default build function imports ``tvm.s_tir.tensor_intrin``
(every tensor intrinsic TVM has, 25-35 s on this 2-core machine) against a 30 s timeout, so
every candidate was killed ("Build errors: N sample(s)"; the task log says "LocalBuilder:
Timeout, killed after 30.0 seconds"). :func:`build_candidate` builds without that import.

The log (``database_*.json``) lives in :func:`llmc.targets.tvm.build.tuning_dir`, keyed by the
target, TVM version, llmc's printed IR, the lowered TVM module's text and the trial count, and is
reused by later compiles.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.compiler.errors import TargetUnavailableError, UnsupportedError
from llmc.targets.tvm.schedules import DECODE_FUNCTION, cpu_pipeline, decode_kernels, fuse, gemv_fits, gemv_space

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 60.0
POPULATION = 128
"""Evolutionary-search population per round for kernels outside the GEMV space (TVM's default
of 512 spends minutes per task drawing candidates on 2 cores; with the random cost model a
smaller one loses little)."""


@dataclass
class TuneReport:
    """What tuning did, for the manifest."""

    tasks: list[str] = field(default_factory=list)
    records: int = 0
    applied: list[str] = field(default_factory=list)
    untuned_gemv: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False
    notes: list[str] = field(default_factory=list)


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """Meta-schedule's build function without the 30-second ``tvm.s_tir.tensor_intrin`` import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def decode_tasks(fused: Any, target: Any) -> list[Any]:
    """The static-shape matmul tasks that ``decode_b1`` calls (each with its fused epilogue)."""
    from tvm.s_tir import meta_schedule as ms

    called = decode_kernels(fused)
    if not called:
        raise UnsupportedError("--tune tunes the batch-1 decode function, but the module has no decode function")
    decode_only = fused.__class__({gv: f for gv, f in fused.functions.items()
                                   if gv.name_hint == DECODE_FUNCTION or gv.name_hint in called})
    tasks = ms.relax_integration.extract_tasks(decode_only, target)
    return [t for t in tasks if "matmul" in t.task_name and _static(t.dispatched[0]["main"])]


def _static(func: Any) -> bool:
    """True when the PrimFunc declares no symbolic shape variable (meta-schedule needs static shapes)."""
    text = func.script()
    return not any(f"= T.{t}()" in text for t in ("int64", "int32"))


@contextlib.contextmanager
def x86_intrinsics_only() -> Iterator[None]:
    """Let meta-schedule's ``import tvm.s_tir.tensor_intrin`` register only the x86 intrinsics.

    That import registers every tensor intrinsic TVM has (CUDA's alone take 20+ s here); CPU
    tuning can only use x86 ones. Inside the block the package is a stand-in holding just
    ``x86``; afterwards it is removed, so a later import loads the real package (which then
    reuses the already imported ``x86`` module instead of registering it twice).
    """
    name = "tvm.s_tir.tensor_intrin"
    spec = None if name in sys.modules else importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        yield
        return
    stand_in = types.ModuleType(name)
    stand_in.__path__ = list(spec.submodule_search_locations)
    stand_in.__spec__ = spec
    stand_in.__package__ = name
    sys.modules[name] = stand_in
    try:
        importlib.import_module(f"{name}.x86")
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]


def tune(tasks: list[Any], work: Path, trials: int) -> float:
    """Run meta-schedule on ``tasks`` with ``trials`` measured candidates in all; returns seconds."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    start = time.perf_counter()
    loggers = get_loggers_from_work_dir(str(work), [t.task_name for t in tasks])
    contexts = []
    for task, logger in zip(tasks, loggers, strict=True):
        func = task.dispatched[0]
        if gemv_fits(func):
            space, search = ms.space_generator.ScheduleFn(gemv_space, [], [], {}), "replay-trace"
        else:
            space, search = "post-order-apply", ms.search_strategy.EvolutionarySearch(population_size=POPULATION)
        contexts.append(ms.TuneContext(mod=func, target=task.target, space_generator=space, search_strategy=search,
                                       task_name=task.task_name, logger=logger, rand_state=len(contexts) + 1,
                                       num_threads="physical").clone())
    per_iter = max(4, min(32, trials // max(1, 2 * len(tasks))))
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)
    ms.tune_tasks(
        tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=str(work),
        max_trials_global=trials, num_trials_per_iter=per_iter, cost_model="random",
        builder=ms.builder.LocalBuilder(f_build=build_candidate, max_workers=1, timeout_sec=BUILD_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=evaluator),
    )
    return time.perf_counter() - start


def compile_tuned(mod: Any, target: Any, trials: int, work: Path, rest: str = "gemv") -> tuple[Any, TuneReport]:
    """Tune ``decode_b1``'s kernels (or reuse the log in ``work``), then build with the records applied.

    ``rest`` (``gemv``, ``dlight`` or ``tvm``) schedules the kernels that are not decode matmuls,
    as ``cpu_schedule`` does for untuned builds.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    missing = [m for m in ("psutil", "cloudpickle") if importlib.util.find_spec(m) is None]
    if missing:
        raise TargetUnavailableError(f"--tune needs {' and '.join(missing)} for TVM's meta-schedule",
                                     hint="pip install -e '.[tvm]'")
    report = TuneReport()
    tasks = decode_tasks(fuse(mod, target), target)
    report.tasks = [t.task_name for t in tasks]
    done = work / "llmc_done.json"
    if done.exists():
        report.reused = True
        report.seconds = float(json.loads(done.read_text()).get("seconds", 0.0))
    elif tasks:
        work.mkdir(parents=True, exist_ok=True)
        with x86_intrinsics_only():
            report.seconds = tune(tasks, work, trials)
        done.write_text(json.dumps({"trials": trials, "tasks": report.tasks, "seconds": round(report.seconds, 1)}))
    database = ms.database.JSONDatabase(work_dir=str(work)) if work.exists() else ms.database.MemoryDatabase()
    report.records = len(database.get_all_tuning_records())
    scheduled: dict[str, list[str]] = {}
    try:
        exe = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, rest, database, scheduled))
    except Exception as exc:  # TVM raises many types; keep the cause
        cause = str(exc).strip().splitlines()[-1]
        raise UnsupportedError(f"tvm.compile with the tuned schedules failed: {cause}") from exc
    report.applied = scheduled.get("tuned", [])
    report.untuned_gemv = scheduled.get("gemv", [])
    report.notes.append(
        f"meta-schedule: {'reused' if report.reused else 'tuned'} {len(tasks)} decode_b1 kernels "
        f"({trials} trials, {report.seconds:.0f} s of tuning, log {work}); "
        f"{len(report.applied)} kernels built from {report.records} tuning records"
        + (f", {len(report.untuned_gemv)} with the untuned GEMV schedule" if report.untuned_gemv else "")
        + f"; token-tiled matmul schedule on {len(scheduled.get('token_matmul', []))} prefill/decode kernels")
    if tasks and not report.applied:
        report.notes.append("meta-schedule produced no valid schedule: the decode kernels are not tuned")
    log.info(report.notes[0])
    return exe, report
