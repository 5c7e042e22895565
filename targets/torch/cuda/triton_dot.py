"""``dot``: the one matrix product the Triton kernels use, and what it does under the interpreter.

On a GPU, half-precision operands go to the tensor cores as they are (float32 accumulation) and float32
operands are multiplied in IEEE float32 (``input_precision="ieee"``, not TF32). Triton 3.6's interpreter
(``TRITON_INTERPRET=1``, how ``make test`` runs the kernels on a CPU) multiplies bfloat16 operands wrongly
(a 16x16 product of random bfloat16 values came out near 1e10), so there the operands are widened to
float32 first: every bfloat16 and float16 value is exact in float32, so the products are the same and only
the summation order can differ, which is what the tensor cores' float32 accumulation leaves open anyway.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""Read when the kernels are defined, as Triton itself reads it."""


@triton.jit
def dot(a, b, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    """``a @ b`` with float32 accumulation (see the module docstring for ``IEEE`` and ``WIDEN``)."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
