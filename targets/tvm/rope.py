"""How the IR's RoPE is realised by TVM's paged KV cache (the tvm target applies RoPE there).

The cache applies RoPE itself (``RopeMode.NORMAL``: rotate q, rotate k before it is stored)
and computes positions from the sequence lengths given to ``begin_forward``, so every layer must
be a ``rope_attention`` (the ``fold-rope`` rewrite the target asks for) reading the function's
``positions`` input, and all layers must share one RoPE setting. The IR's two rope styles map
as follows:

* ``half`` (NEOX/HF, rotate ``(x[i], x[i + r/2])``): TVM's default rope, with or without
  Llama 3 frequency scaling (TVM's ``rope_freq_llama3`` is the same formula as
  :func:`llmc.compiler.ir.rope.inv_frequencies`).
* ``interleaved`` (GGML/Meta, rotate ``(x[2i], x[2i+1])``): TVM's ``gptj`` rope type when there
  is no frequency scaling. TVM has no interleaved Llama 3 rope, so with scaling the rotary dims
  of q and k are permuted (evens first, then odds) before the cache: rotate-half of the
  permuted vector equals the permuted interleaved rotation, dot products q.k are unchanged by a
  common permutation, and v (hence the attention output) is not permuted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Function, Module, Node
from llmc.compiler.ir.rope import RopeSpec


@dataclass(frozen=True)
class RopePlan:
    """How the IR's RoPE is realised by TVM's KV cache."""

    theta: float
    rotary_dim: int
    style: str
    rope_scaling: dict[str, Any]
    permute: bool

    def to_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "rotary_dim": self.rotary_dim, "style": self.style,
                "rope_scaling": dict(self.rope_scaling), "permute_qk": self.permute}


def input_node(fn: Function, name: str) -> Node | None:
    for node in fn.inputs:
        if node.attrs["name"] == name:
            return node
    return None


def check_positions(node: Node, positions: Node | None) -> None:
    """The cache computes positions itself: a ``rope_attention`` must read the function's ``positions``."""
    if positions is None or node.inputs[3].node is not positions:
        raise UnsupportedError(f"{node}: rope positions must be the function's `positions` input")


def rope_plan(module: Module) -> RopePlan:
    """The one RoPE setting every ``rope_attention`` of ``module`` shares (checked)."""
    specs: set[RopeSpec] = set()
    for fn in module:
        positions = input_node(fn, "positions")
        for node in fn.nodes:
            if node.op == "rope_attention":
                check_positions(node, positions)
                specs.add(RopeSpec.from_attrs(node.attrs))
    if len(specs) != 1:
        raise UnsupportedError(f"the tvm target needs one RoPE setting for all layers, found {len(specs)}")
    return plan_for(specs.pop())


def plan_for(spec: RopeSpec) -> RopePlan:
    """TVM's rope type (and whether q/k are permuted) for one RoPE setting."""
    scaling: dict[str, Any] = {}
    if spec.scaling == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": float(spec.factor),  # type: ignore[arg-type]
            "low_freq_factor": float(spec.low_freq_factor),  # type: ignore[arg-type]
            "high_freq_factor": float(spec.high_freq_factor),  # type: ignore[arg-type]
            "original_max_position_embeddings": float(spec.original_max_position),  # type: ignore[arg-type]
        }
    elif spec.scaling is not None:
        raise UnsupportedError(f"the tvm target does not support rope scaling {spec.scaling!r}")
    permute = False
    if not spec.half:
        if scaling:
            permute = True
        else:
            scaling = {"rope_type": "gptj"}
    return RopePlan(spec.theta, spec.rotary_dim, spec.style, scaling, permute)


def interleaved_to_half(head_dim: int, rotary_dim: int) -> np.ndarray:
    """Head-dim permutation taking interleaved rotary pairs to rotate-half layout."""
    rot = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)])
    return np.concatenate([rot, np.arange(rotary_dim, head_dim)]).astype(np.int32)
