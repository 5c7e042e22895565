"""A workaround for TVM 0.27's TIR common-subexpression elimination on expression ``Let``s.

TVM's paged-KV attention kernels (``batch_prefill_ragged_kv``, ``batch_prefill_paged_kv``, their
sliding-window and tree-attention variants) hold an inline-RoPE branch written as nested
expression ``Let``s (``relax/frontend/nn/llm/_kernel_common.py: _rope``). With Llama 3 frequency
scaling the inner value repeats ``max(0, min(1, alpha * orig_freq - beta))``, a subexpression of the
``Let``-bound ``orig_freq``; in float32 kernels (no casts in between) ``CommonSubexprElim`` hoists
it into a statement-level ``cse_v`` binding *outside* the ``Let`` that defines ``orig_freq``, and
the build fails with ``variable cse_vN has been used before definition``. (SmolLM2 has no RoPE
scaling; fp16/bf16 kernels put casts between the repeats.) :func:`inline_let_expressions`
substitutes every expression ``Let`` by its value before the build, so CSE sees plain expressions
and shares the repeats itself; the kernels compute the same values.
"""

from __future__ import annotations

from typing import Any


def inline_let_expressions(mod: Any) -> tuple[Any, list[str]]:
    """``mod`` with every expression-level ``tirx.Let`` of its PrimFuncs replaced by its body with the
    bound variable substituted; returns the module and the names of the PrimFuncs changed."""
    import tvm
    from tvm import tirx
    from tvm_ffi import structural_mutate

    changed = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        lets = []

        def on_let(let: Any, mutator: Any) -> Any:
            lets.append(let.var)  # noqa: B023 - used within this iteration only
            mutator.var_remap_set(let.var, mutator.mutate(let.value))
            return mutator.mutate(let.body)

        new = structural_mutate(func, [(tirx.Let, on_let)])
        if lets:
            mod[gv] = new
            changed.append(gv.name_hint)
    return mod, sorted(changed)
