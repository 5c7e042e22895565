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

DECODE_FUNCTION = "decode_b1"  # llmc.targets.tvm.model.DECODE_ONE
LANES = (4, 8, 16, 32)
GEMV_DEFAULT = (8, 4)
"""(lanes, rows) of the untuned GEMV schedule: the best or within a few % of it for every
SmolLM2 kernel in a 128-trial tune, where the worst choices were 2x slower."""
TOKEN_MATMUL = (8, 4, 2)
"""(lanes, rows, tokens) of :func:`schedule_token_matmul`: 49 GFLOP/s on a 128 x 576 x 3072 float32
matmul at 2 threads here, against 1.7 unscheduled (sweep of 10 choices: 27-52)."""
CPU_SCHEDULES = ("gemv", "dlight", "tvm")
"""``gemv`` (the default), ``dlight``, or ``tvm``: TVM's own CPU pipeline (kernels left unscheduled)."""


def fuse(mod: Any, target: Any) -> Any:
    """TVM's CPU dispatch, legalization and fusion: the PrimFuncs that get scheduled and built."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(target) + cpu.legalize_passes(target))(mod)


def decode_kernels(fused: Any) -> set[str]:
    """Names of the PrimFuncs that ``decode_b1`` calls (empty when there is no ``decode_b1``)."""
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
    block, epilogue, (t, o, k) = _matmul_loops(sch)
    if int(sch.get(t).extent) != 1:
        raise ValueError("not a batch-1 matmul")
    choices = _lane_choices(sch, k)
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
        factors = [None, _dividing(rows, int(sch.get(o).extent))]
    o_outer, o_inner = sch.split(o, factors)
    sch.reorder(t, o_outer, k_outer, o_inner, k_lanes)
    row_blocks = sch.fuse(t, o_outer)
    sch.parallel(row_blocks)
    sch.unroll(o_inner)
    sch.vectorize(k_lanes)
    _finish(sch, block, epilogue, rf, row_blocks, k_outer)


def schedule_token_matmul(sch: Any, lanes: int = TOKEN_MATMUL[0], rows: int = TOKEN_MATMUL[1],
                          tokens: int = TOKEN_MATMUL[2]) -> None:
    """Schedule a matmul over a symbolic number of tokens (``prefill``, batched ``decode``).

    Like :func:`schedule_gemv` each output accumulates ``lanes`` partial sums from contiguous
    loads, and in addition a ``tokens x rows`` tile of outputs shares every load: per step of
    ``k`` the tile reads ``tokens`` activation vectors and ``rows`` weight vectors for
    ``tokens x rows`` FMAs. Row blocks run in parallel and keep their weights in cache over all
    token tiles; the last tile is predicated. Raises when the kernel is not such a matmul.
    """
    from tvm import tirx

    block, epilogue, (t, o, k) = _matmul_loops(sch)
    if isinstance(sch.get(t).extent, tirx.IntImm):
        raise ValueError("not a matmul over a symbolic number of tokens")
    vec = max(v for v in _lane_choices(sch, k) if v <= max(lanes, 4))
    _, k_lanes = sch.split(k, [None, vec])
    rf = sch.rfactor(k_lanes, factor_axis=2)
    t, o, k_outer, k_lanes = sch.get_loops(rf)
    o_outer, o_inner = sch.split(o, [None, _dividing(rows, int(sch.get(o).extent))])
    t_outer, t_inner = sch.split(t, [None, tokens])
    sch.reorder(o_outer, t_outer, k_outer, t_inner, o_inner, k_lanes)
    sch.parallel(o_outer)
    sch.unroll(t_inner)
    sch.unroll(o_inner)
    sch.vectorize(k_lanes)
    _finish(sch, block, epilogue, rf, t_outer, k_outer)


def _finish(sch: Any, block: Any, epilogue: list[str], rf: Any, tile: Any, k_outer: Any) -> None:
    """Sum the lane partials and run the epilogue per ``tile``; zero the partials before ``k_outer``."""
    sch.reverse_compute_at(block, tile)
    for name in epilogue:
        sch.reverse_compute_at(sch.get_sblock(name), tile)
    sch.decompose_reduction(rf, k_outer)


def _matmul_loops(sch: Any) -> tuple[Any, list[str], list[Any]]:
    """The ``matmul`` block (its dequantize producer inlined), its epilogue blocks, its 3 loops."""
    block = sch.get_sblock("matmul")
    for producer in sch.get_producers(block):  # the dequantize stage of a quantized weight
        sch.compute_inline(producer)
    order = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    loops = sch.get_loops(block)
    if len(loops) != 3:
        raise ValueError("not a [tokens, out] x [out, in] matmul")
    return block, order[order.index("matmul") + 1:], list(loops)


def _lane_choices(sch: Any, k: Any) -> list[int]:
    choices = [v for v in LANES if int(sch.get(k).extent) % v == 0]
    if not choices:
        raise ValueError("the reduction length is not a multiple of 4")
    return choices


def _dividing(wanted: int, extent: int) -> int:
    """The largest of ``wanted``, 2, 1 that is at most ``wanted`` and divides ``extent``."""
    return max(r for r in (wanted, 2, 1) if r <= wanted and extent % r == 0)


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
    return _apply(mod, lambda sch: schedule_gemv(sch, *GEMV_DEFAULT), names)


def apply_token_matmuls(mod: Any) -> tuple[Any, list[str]]:
    """Give every unscheduled matmul kernel over a symbolic number of tokens :func:`schedule_token_matmul`."""
    return _apply(mod, schedule_token_matmul)


def _apply(mod: Any, schedule: Any, names: set[str] | None = None) -> tuple[Any, list[str]]:
    """Run ``schedule`` on each unscheduled PrimFunc of ``mod`` (those in ``names``, if given),
    keeping TVM's default where it raises; returns the module and the scheduled kernels' names."""
    import tvm
    from tvm.s_tir.schedule import Schedule

    done = []
    for gv, func in list(mod.functions.items()):
        if names is not None and gv.name_hint not in names:
            continue
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled", False)):
            continue
        sch = Schedule(tvm.IRModule({"main": func}))
        try:
            schedule(sch)
        except Exception:  # no matmul block, a shape the schedule does not fit: keep TVM's default
            continue
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        done.append(gv.name_hint)
    return mod, sorted(done)


def cpu_pipeline(target: Any, schedule: str = "gemv", database: Any = None,
                 record: dict[str, list[str]] | None = None) -> Any:
    """TVM's CPU pipeline with llmc's schedules.

    After fusion: the ``database``'s tuning records (meta-schedule), then for ``gemv`` or a
    tuned build the untuned GEMV schedule on ``decode_b1``'s remaining matmul kernels and the
    token-tiled schedule on the symbolic-token ones (``prefill``, batched ``decode``), then for
    ``dlight`` dlight's CPU GEMV/reduction rules on whatever is still unscheduled. ``record``
    (if given) receives the kernels scheduled by each step (``tuned``, ``gemv``, ``token_matmul``).
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
                mod, out["token_matmul"] = apply_token_matmuls(mod)
            if schedule == "dlight":
                mod = dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
            return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)

    return _pipeline


def _scheduled(mod: Any) -> set[str]:
    """Names of the PrimFuncs in ``mod`` marked as already scheduled."""
    import tvm

    return {gv.name_hint for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and f.attrs.get("tirx.is_scheduled", False)}
