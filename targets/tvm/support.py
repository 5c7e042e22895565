"""What the tvm target refuses before lowering: functions it does not lower, and shapes TVM's
CUDA attention kernel cannot launch."""

from __future__ import annotations

from typing import Any

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ir.graph import Module

FUNCTION_INPUTS = {"prefill": ("input_ids", "logits_index"), "decode": ("input_ids",)}
CUDA_MAX_BLOCK_Z = 64


def check_functions(module: Module) -> None:
    """Raise :class:`UnsupportedError` unless the module's functions are ``prefill`` (and ``decode``)."""
    for fn in module:
        if fn.name not in FUNCTION_INPUTS:
            raise UnsupportedError(f"the tvm target lowers functions prefill and decode, not {fn.name!r}")
    if "prefill" not in module.functions:
        raise UnsupportedError("the module has no prefill function")


def check_cuda_decode_attention(config: dict[str, Any]) -> None:
    """Refuse shapes for which TVM's paged decode-attention kernel cannot launch on CUDA.

    TVM 0.27 (``relax/frontend/nn/llm/_decode_kernels.py``) fills a block of 512 threads as
    ``(head_dim / 4, group, 512 / (head_dim / 4 * group))`` (its vector width assumes 2-byte
    q/k/v whatever the dtype) and checks ``threadIdx.z`` against 64 only for WebGPU; on CUDA a
    larger z fails at run time with CUDA_ERROR_INVALID_VALUE. Tiny heads (head_dim 8) hit it.
    """
    head_dim, group = int(config["head_dim"]), int(config["num_heads"]) // int(config["num_kv_heads"])
    bdx, bdy = max(1, head_dim // 4), group
    while bdx * bdy > 512 and bdy > 1:
        bdy //= 2
    bdz = max(512, bdx * bdy) // (bdx * bdy)
    if bdz > CUDA_MAX_BLOCK_Z:
        raise UnsupportedError(
            f"TVM's CUDA decode-attention kernel would launch blocks of ({bdx}, {bdy}, {bdz}) threads for "
            f"head_dim {head_dim} with {group} query heads per kv head; CUDA allows at most {CUDA_MAX_BLOCK_Z} "
            "threads in z (head_dim x group must be >= 32); use the torch target on CUDA for this model")
