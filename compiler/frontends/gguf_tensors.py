"""A GGUF file's tensors as llmc weights under canonical names.

Q8_0, Q4_0 and Q4_1 blocks can be kept as :class:`QuantizedTensor` bit for bit
(``native_quant=True``); every other type, and every type when ``native_quant`` is False, is
dequantized with ``gguf.quants``. Tensors load lazily from the memory map.
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
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore, pack_codes

log = logging.getLogger(__name__)

T = GGMLQuantizationType
DEQUANTIZED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                     T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
NATIVE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)

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
    """A Q8_0, Q4_0 or Q4_1 tensor as :class:`QuantizedTensor`, bit for bit (no requantization)."""
    shape = _logical_shape(t)
    if len(shape) != 2:
        raise UnsupportedError(f"{path}: tensor {t.name!r} is {len(shape)}-D; native quant blocks need 2-D")
    out, inp = shape
    raw = np.asarray(t.data, dtype=np.uint8)
    qtype = t.tensor_type
    if qtype == T.Q8_0:
        blocks = raw.reshape(out, inp // 32, 34)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(out, -1)
        codes = (blocks[..., 2:] ^ np.uint8(0x80)).reshape(out, inp)  # int8 v -> uint8 v + 128
        return QuantizedTensor(QuantSpec(8, 32, True), shape, np.ascontiguousarray(codes), scales)
    head = 2 if qtype == T.Q4_0 else 4
    blocks = raw.reshape(out, inp // 32, head + 16)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(out, -1)
    qs = blocks[..., head:]
    # ggml: element j of a block is the low nibble of byte j, element j + 16 its high nibble
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).reshape(out, inp)
    packed = pack_codes(codes, 4)
    if qtype == T.Q4_0:
        return QuantizedTensor(QuantSpec(4, 32, True), shape, packed, scales)
    offsets = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(out, -1)
    return QuantizedTensor(QuantSpec(4, 32, False), shape, packed, scales, offsets)


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
