"""CPU (llvm) schedules of the tvm target: llmc's GEMV schedule for the batch-1 decode and the pipeline.

Batch-1 decode is one matrix-vector product per weight, ``y[0, o] = sum_k x[0, k] * w[o, k]``
with ``w`` row-major ``[out, in]``, and it is bound by streaming the weights from memory.
:func:`schedule_gemv` splits the reduction into ``k_outer x lanes`` and rfactors it, so each
output row accumulates ``lanes`` partial sums from contiguous loads of its weight row, ``rows``
rows at a time (one load of ``x`` feeds them), row blocks in parallel. TVM's default CPU
pipeline leaves these kernels as plain loop nests, and its meta-schedule CPU space and dlight's
CPU GEMV rule vectorise along ``o`` (strided weight loads); both are 2-4x slower on SmolLM2.
Fused dequantization (:mod:`llmc.targets.tvm.quant`) is inlined into the load and fused
epilogues (residual add, SiLU, cast) run per row block.

``lanes`` and ``rows`` are what ``--tune`` searches (:func:`gemv_space`); ``cpu_schedule=gemv``
uses fixed values (:data:`GEMV_DEFAULT`) with no tuning.
"""

from __future__ import annotations

from typing import Any

DECODE_FUNCTION = "decode_1"
LANES = (4, 8, 16, 32)
GEMV_DEFAULT = (8, 4)
"""(lanes, rows) of the untuned GEMV schedule: the best or within a few % of it for every
SmolLM2 kernel in a 128-trial tune, where the worst choices were 2x slower."""
CPU_SCHEDULES = ("gemv", "dlight", "tvm")
"""``gemv`` (the default), ``dlight``, or ``tvm``: TVM's own CPU pipeline (kernels left unscheduled)."""


def fuse(mod: Any, target: Any) -> Any:
    """TVM's CPU dispatch, legalization and fusion: the PrimFuncs that get scheduled and built."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)


def decode_kernels(fused: Any) -> set[str]:
    """Names of the PrimFuncs that ``decode_1`` calls (empty when there is no ``decode_1``)."""
    import tvm
    from tvm import relax

    if DECODE_FUNCTION not in [gv.name_hint for gv in fused.functions]:
        return set()
    called: set[str] = set()
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            called.add(expr.args[0].name_hint)

    relax.analysis.post_order_visit(fused[DECODE_FUNCTION].body, visit)
    return called


def schedule_gemv(sch: Any, lanes: int | None = None, rows: int | None = None) -> None:
    """Schedule the batch-1 matmul in ``sch``; ``None`` samples the choice (a tuning decision).

    Fixed ``lanes``/``rows`` that do not divide the shape fall back to the nearest smaller ones.
    Raises (a TVM error or ``ValueError``) when the kernel is not a batch-1 matmul whose
    reduction length is a multiple of 4.
    """
    block = sch.get_sblock("matmul")
    for producer in sch.get_producers(block):  # the dequantize stage of a quantized weight
        sch.compute_inline(producer)
    order = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    epilogue = order[order.index("matmul") + 1:]
    loops = sch.get_loops(block)
    if len(loops) != 3 or int(sch.get(loops[0]).extent) != 1:
        raise ValueError("not a batch-1 matmul")
    t, o, k = loops
    choices = [v for v in LANES if int(sch.get(k).extent) % v == 0]
    if not choices:
        raise ValueError("the reduction length is not a multiple of 4")
    if lanes is None:
        vec: Any = sch.sample_categorical(candidates=choices, probs=[1.0 / len(choices)] * len(choices))
    else:  # the widest choice up to ``lanes`` (4 always divides)
        vec = max(v for v in choices if v <= max(lanes, choices[0]))
    _, k_lanes = sch.split(k, [None, vec])
    rf = sch.rfactor(k_lanes, factor_axis=2)
    t, o, k_outer, k_lanes = sch.get_loops(rf)
    if rows is None:
        factors = sch.sample_perfect_tile(o, n=2, max_innermost_factor=8)
    else:
        rows = max(r for r in (rows, 2, 1) if r <= rows and int(sch.get(o).extent) % r == 0)
        factors = [None, rows]
    o_outer, o_inner = sch.split(o, factors)
    sch.reorder(t, o_outer, k_outer, o_inner, k_lanes)
    row_blocks = sch.fuse(t, o_outer)
    sch.parallel(row_blocks)
    sch.unroll(o_inner)
    sch.vectorize(k_lanes)
    sch.reverse_compute_at(block, row_blocks)
    for name in epilogue:
        sch.reverse_compute_at(sch.get_sblock(name), row_blocks)
    sch.decompose_reduction(rf, k_outer)


def gemv_space(sch: Any) -> None:
    """Meta-schedule design space (``ScheduleFn``): :func:`schedule_gemv` with sampled choices."""
    schedule_gemv(sch)


def gemv_fits(func: Any) -> bool:
    """True when :func:`schedule_gemv` applies to the PrimFunc module ``func``."""
    from tvm.s_tir.schedule import Schedule

    try:
        schedule_gemv(Schedule(func))
    except Exception:  # any schedule error: the schedule does not fit this kernel
        return False
    return True


def apply_gemv(mod: Any, names: set[str]) -> tuple[Any, list[str]]:
    """Give the unscheduled kernels ``names`` of ``mod`` the untuned GEMV schedule where it fits."""
    import tvm
    from tvm.s_tir.schedule import Schedule

    done = []
    for gv, func in list(mod.functions.items()):
        if gv.name_hint not in names or not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs and func.attrs.get("tirx.is_scheduled", False):
            continue
        sch = Schedule(tvm.IRModule({"main": func}))
        try:
            schedule_gemv(sch, *GEMV_DEFAULT)
        except Exception:  # any schedule error: keep TVM's default for this kernel
            continue
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        done.append(gv.name_hint)
    return mod, sorted(done)


def cpu_pipeline(target: Any, schedule: str = "gemv", database: Any = None,
                 record: dict[str, list[str]] | None = None) -> Any:
    """TVM's CPU pipeline with llmc's schedules.

    After fusion: the ``database``'s tuning records (meta-schedule), then for ``gemv`` or a
    tuned build the untuned GEMV schedule on ``decode_1``'s remaining matmul kernels, then for
    ``dlight`` dlight's CPU GEMV/reduction rules on whatever is still unscheduled. ``record``
    (if given) receives the kernels scheduled by each step (``tuned``, ``gemv``).
    """
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    if schedule not in CPU_SCHEDULES:
        raise ValueError(f"unknown cpu schedule {schedule!r}")
    out = record if record is not None else {}

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            mod = fuse(mod, target)
            if database is not None:
                from tvm.relax.transform import MetaScheduleApplyDatabase

                before = _scheduled(mod)
                with database:
                    mod = MetaScheduleApplyDatabase()(mod)
                out["tuned"] = sorted(_scheduled(mod) - before)
            if schedule == "gemv" or database is not None:
                mod, out["gemv"] = apply_gemv(mod, decode_kernels(mod))
            if schedule == "dlight":
                mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
            return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    return _pipeline


def _scheduled(mod: Any) -> set[str]:
    """Names of the PrimFuncs in ``mod`` marked as already scheduled."""
    import tvm

    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled", False)}
