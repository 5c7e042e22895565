"""llmc's paged KV cache in the Relax graph: TVM's TIR attention kernels called as ``call_tir``.

The cache is one tensor per layer, ``pages [num_pages, 2, kv_heads, page_size, head_dim]`` (TVM's
page layout: keys then values), and a page is a runtime KV block (block id = page index), so the
runtime's block tables drive it and blocks can be shared between sequences (prefix caching). One
layer's attention in a step:

* ``fused_rope(qkv, positions) -> q, k, v``: TVM's ``llama_rope_with_position_map`` (RoPE as the
  IR asks, :mod:`llmc.targets.tvm.rope`);
* ``kv_append(pages, k, v, slots)``, in place: token ``t`` goes to slot ``slots[t]`` (``page *
  page_size + offset``; ``-1`` writes nothing, for the rows that pad a batch to its bucket);
* attention of ``q`` over the pages of each sequence (``page_indptr``, ``page_values``,
  ``last_page_len``: TVM's CSR page tables) with TVM's batch-decode kernel in decode functions
  (one token per sequence) and its causal paged-prefill kernel in ``prefill`` (ragged chunks
  after ``q_indptr``).

The kernels' scalar parameters (rotary mode 0: RoPE is already applied; scale; theta; softmax
scale; causal) are bound at build time with ``PrimFunc.specialize``, so every call is a plain
``call_tir`` over tensors.

Why not TVM's ``PagedKVCache`` object: its attention is an opaque runtime call
(``vm.builtin.attention_kv_cache_attention_with_fused_qkv``) that ``RewriteCUDAGraph`` cannot
capture, so a decode step ran as one CUDA graph per gap between layers' attentions plus host work
per layer. Here a decode function is ``call_tir``s over tensors the executor keeps alive (pages,
page tables, token ids: all marked static, see :data:`STEP_INPUTS`), which the rewrite captures as
one graph per batch bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DECODE_INPUTS = ("input_ids", "positions", "slots", "page_indptr", "page_values", "last_page_len")
"""Inputs of a decode function, in order (then the pages of every layer, then the weights)."""
PREFILL_INPUTS = ("input_ids", "positions", "slots", "q_indptr", "page_indptr", "page_values", "last_page_len",
                  "logits_index")
"""Inputs of ``prefill``, in order (then the pages of every layer, then the weights)."""
SEQUENCE_SHAPED = ("page_indptr", "last_page_len", "q_indptr")
"""Inputs with one entry per sequence (``page_indptr``/``q_indptr``: one more); the rest are per token,
but ``page_values`` (every sequence's pages, concatenated) and ``logits_index``."""


@dataclass(frozen=True)
class PagedKernels:
    """TVM's TIR kernels for one model's attention, scalars bound."""

    rope: Any
    append: Any
    decode: Any
    prefill: Any
    page_size: int


def _bind(func: Any, **values: float) -> Any:
    """``func`` with its scalar parameters ``values`` bound to constants (removed from its signature)."""
    from tvm import tirx

    params = {p.name: p for p in func.params}
    binding = {}
    for name, value in values.items():
        var = params[name]
        dtype = str(var.ty)
        binding[var] = tirx.IntImm(dtype, int(value)) if "int" in dtype else tirx.FloatImm(dtype, float(value))
    return func.specialize(binding)


def paged_kernels(target: Any, num_heads: int, num_kv_heads: int, head_dim: int, dtype: str, theta: float,
                  rope_scaling: dict[str, Any], rotary_dim: int, sm_scale: float, page_size: int) -> PagedKernels:
    """The kernels for ``target`` (TVM's CPU variants on llvm, its GPU ones otherwise)."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode, _attention_decode_cpu
    from tvm.relax.frontend.nn.llm._page_kernels import _kv_cache_transpose_append
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill, _attention_prefill_cpu
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    scalars = {"rotary_mode": 0, "rope_scale": 1.0, "rope_theta": theta, "sm_scale": sm_scale}
    cpu = target.kind.name == "llvm"
    if cpu:
        decode = _attention_decode_cpu(num_kv_heads, num_heads, head_dim, dtype, False, rope_scaling, page_size)
        prefill = _attention_prefill_cpu(num_kv_heads, num_heads, head_dim, dtype, False, rope_scaling, page_size)
    else:
        decode = _attention_decode(num_kv_heads, num_heads, head_dim, dtype, False, rope_scaling, target, page_size)
        prefill = _attention_prefill(num_kv_heads, num_heads, head_dim, dtype, False, rope_scaling, target, page_size)
    rope = llama_rope_with_position_map(theta, 1.0, head_dim, num_heads, num_kv_heads, dtype, rope_scaling,
                                        rotary_dim)
    return PagedKernels(
        rope=_bind(rope, apply_rope=1),
        append=_kv_cache_transpose_append(num_kv_heads, head_dim, dtype, page_size),
        decode=_bind(decode, **scalars),
        prefill=_bind(prefill, causal=1, **scalars),
        page_size=page_size,
    )


def paged_attention(kernels: PagedKernels, qkv: Any, pages: Any, inputs: dict[str, Any], num_heads: int,
                    num_kv_heads: int, head_dim: int, decode: bool) -> tuple[Any, Any]:
    """One layer's attention (``qkv [tokens, heads + 2 kv_heads, head_dim]``, an ``nn.Tensor``); returns
    ``(out [tokens, heads, head_dim], pages after the append)``."""
    from tvm.relax.frontend import nn

    tokens, dtype = qkv.shape[0], qkv.dtype
    q, k, v = nn.op.tensor_ir_op(
        kernels.rope, "fused_rope", [qkv, inputs["positions"]],
        [nn.Tensor.placeholder((tokens, num_heads, head_dim), dtype),
         nn.Tensor.placeholder((tokens, num_kv_heads, head_dim), dtype),
         nn.Tensor.placeholder((tokens, num_kv_heads, head_dim), dtype)])
    pages = nn.op.tensor_ir_inplace_op(kernels.append, "kv_append", [pages, k, v, inputs["slots"]], 0,
                                       nn.Tensor.placeholder(pages.shape, pages.dtype))
    outputs = [nn.Tensor.placeholder((tokens, num_heads, head_dim), dtype),
               nn.Tensor.placeholder((tokens, num_heads), "float32")]
    tables = [inputs["page_indptr"], inputs["page_values"], inputs["last_page_len"]]
    # k_rope_pos_offset and q_rope_position are read only with rotary_mode 1 (bound to 0): any int32 of the shape
    if decode:
        out, _lse = nn.op.tensor_ir_op(kernels.decode, "attention_decode",
                                       [q, pages, *tables, inputs["positions"], inputs["positions"]], outputs)
    else:
        out, _lse = nn.op.tensor_ir_op(kernels.prefill, "attention_prefill",
                                       [q, inputs["q_indptr"], pages, *tables, inputs["last_page_len"],
                                        inputs["positions"]], outputs)
    return out, pages
