"""The reference target's lowering table: the reference interpreter's kernels, one per op.

There is nothing to compile: :class:`~llmc.compiler.ir.interp.Interpreter` runs the IR as it
is. The table is the interpreter's own kernel table, so it lowers every op the IR defines (the
op-table test checks that); the executor checks a module against it before running anything.
"""

from __future__ import annotations

from llmc.compiler.ir.interp import KERNELS, Kernel
from llmc.targets.lowering import LoweringTable

REFERENCE_OPS: LoweringTable[Kernel] = LoweringTable("reference", KERNELS)
