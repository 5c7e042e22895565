"""A GGUF file's tensors as llmc weights under canonical names.

With ``native_quant=True`` the quantized block types of :data:`llmc.compiler.ggml_blocks.FORMATS`
are kept as stored (:meth:`QuantizedTensor.from_ggml`) and F16/BF16 stay half precision; else
every type is dequantized to float32 with ``gguf.quants``. :func:`adapt_for_target` turns kept
blocks into what a target runs when it does not run that block type itself (llmc's own int4/int8
layout where exact, float32 otherwise). Tensors load lazily from the memory map.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from llmc.compiler.errors import UnsupportedError
from llmc.compiler.ggml_blocks import FORMATS, LLMC_LAYOUT_TYPES
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore, pack_codes

log = logging.getLogger(__name__)

T = GGMLQuantizationType
DEQUANTIZED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                     T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
NATIVE_TYPES = tuple(T[name] for name in FORMATS)
"""Quantized types kept as stored with ``native_quant``."""

_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_TOP_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
ROPE_FREQS = "rope_freqs.weight"


def canonical_name(gguf_name: str) -> str | None:
    """llmc's name for a GGUF ``llama`` tensor, or None if it is not a Llama weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _logical_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def native_quantized(t: Any, path: Path) -> QuantizedTensor:
    """A tensor of a :data:`NATIVE_TYPES` type as its stored blocks (no requantization)."""
    shape = _logical_shape(t)
    if len(shape) != 2:
        raise UnsupportedError(f"{path}: tensor {t.name!r} is {len(shape)}-D; native quant blocks need 2-D")
    return QuantizedTensor.from_ggml(t.tensor_type.name, (shape[0], shape[1]), np.asarray(t.data, dtype=np.uint8))


def llmc_layout(qt: QuantizedTensor) -> QuantizedTensor:
    """Q8_0, Q4_0 or Q4_1 blocks in llmc's own int8/int4 group layout, bit for bit."""
    fmt = qt.ggml_format
    if fmt is None or fmt.name not in LLMC_LAYOUT_TYPES:
        raise ValueError(f"llmc's group layout holds {', '.join(LLMC_LAYOUT_TYPES)} blocks, not {qt.spec.describe()}")
    out, inp = qt.shape
    blocks = qt.qdata.reshape(out, inp // 32, fmt.nbytes)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(out, -1)
    if fmt.name == "Q8_0":
        codes = (blocks[..., 2:] ^ np.uint8(0x80)).reshape(out, inp)  # int8 v -> uint8 v + 128
        return QuantizedTensor(QuantSpec(8, 32, True), qt.shape, np.ascontiguousarray(codes), scales)
    head = 2 if fmt.name == "Q4_0" else 4
    qs = blocks[..., head:]
    # ggml: element j of a block is the low nibble of byte j, element j + 16 its high nibble
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).reshape(out, inp)
    packed = pack_codes(codes, 4)
    if fmt.name == "Q4_0":
        return QuantizedTensor(QuantSpec(4, 32, True), qt.shape, packed, scales)
    offsets = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(out, -1)
    return QuantizedTensor(QuantSpec(4, 32, False), qt.shape, packed, scales, offsets)


def adapt_for_target(weight: Weight, runs: frozenset[str]) -> tuple[Weight, str | None]:
    """``weight`` as a target that runs the ggml block types ``runs`` takes it, and a note when
    blocks were converted (llmc's layout, exact) or dequantized (float32)."""
    fmt = weight.ggml_format if isinstance(weight, QuantizedTensor) else None
    if fmt is None or fmt.name in runs:
        return weight, None
    assert isinstance(weight, QuantizedTensor)
    if fmt.name in LLMC_LAYOUT_TYPES:
        return llmc_layout(weight), None
    dense = weight.dequantize(np.float32)
    return dense, f"{fmt.name} blocks dequantized to float32 ({weight.nbytes / 1e6:.1f} -> {dense.nbytes / 1e6:.1f} MB)"


def read_tensor(t: Any, path: Path, native_quant: bool) -> Weight:
    """One tensor as numpy ``[out, in]`` (or a :class:`QuantizedTensor` for native blocks)."""
    qtype = t.tensor_type
    shape = _logical_shape(t)
    if qtype not in DEQUANTIZED_TYPES:
        raise UnsupportedError(
            f"{path}: tensor {t.name!r} has ggml type {qtype.name}, which llmc does not support; "
            f"supported: {', '.join(x.name for x in DEQUANTIZED_TYPES)}"
        )
    if native_quant and qtype in NATIVE_TYPES:
        return native_quantized(t, path)
    data = np.asarray(t.data)
    if native_quant and qtype == T.F16:
        return data.reshape(shape)
    if native_quant and qtype == T.BF16:
        return data.view(ml_dtypes.bfloat16).reshape(shape)
    if qtype == T.F32:
        return data.reshape(shape)
    return np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(shape)


def load_weights(reader: GGUFReader, path: Path, native_quant: bool) -> WeightStore:
    """Every Llama tensor under its canonical name, read lazily from the memory map."""
    store = WeightStore()
    for t in reader.tensors:
        name = canonical_name(t.name)
        if name is None:
            if t.name != ROPE_FREQS:
                log.warning("%s: ignoring tensor %s (not a Llama weight)", path, t.name)
            continue
        if t.tensor_type not in DEQUANTIZED_TYPES:  # fail at load time, not at first use
            read_tensor(t, path, native_quant)
        store.set_lazy(name, partial(read_tensor, t, path, native_quant))
    if "lm_head" not in store and "embed" in store:
        store.set_lazy("lm_head", lambda: store["embed"])
    return store
