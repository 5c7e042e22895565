"""Write GGUF files from Hugging Face Llama folders the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of HF (rotate-half) Q/K rows to adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """The ``rope_freqs`` divisors llama.cpp's converter writes for ``rope_type: llama3``."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def hf_to_gguf(hf: Path, out: Path, qtypes: dict[str, GGMLQuantizationType] | None = None,
               arch: str = "llama", skip_keys: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> Path:
    """Convert an HF Llama folder to GGUF. ``qtypes`` maps GGUF tensor-name suffixes
    (``"attn_q"``, ``"token_embd"``...) to a ggml type (default F32)."""
    cfg = json.loads((hf / "config.json").read_text())
    tensors = load_file(str(hf / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    w = GGUFWriter(str(out), arch)
    keys: dict[str, Any] = {
        "context_length": (w.add_context_length, cfg["max_position_embeddings"]),
        "embedding_length": (w.add_embedding_length, cfg["hidden_size"]),
        "block_count": (w.add_block_count, cfg["num_hidden_layers"]),
        "feed_forward_length": (w.add_feed_forward_length, cfg["intermediate_size"]),
        "attention.head_count": (w.add_head_count, heads),
        "attention.head_count_kv": (w.add_head_count_kv, kv_heads),
        "rope.dimension_count": (w.add_rope_dimension_count, head_dim),
        "rope.freq_base": (w.add_rope_freq_base, theta),
        "attention.layer_norm_rms_epsilon": (w.add_layer_norm_rms_eps, cfg["rms_norm_eps"]),
        "vocab_size": (w.add_vocab_size, cfg["vocab_size"]),
    }
    for key, (add, value) in keys.items():
        if key not in skip_keys:
            add(value)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for key, value in (extra or {}).items():
        w.add_key_value(key, value[0], value[1])
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(
            theta, head_dim, rope["factor"], rope["low_freq_factor"],
            rope["high_freq_factor"], rope["original_max_position_embeddings"]))

    def add(name: str, array: np.ndarray) -> None:
        short = name.rsplit(".", 2)[-2] if name.startswith("blk.") else name.split(".")[0]
        qtype = (qtypes or {}).get(short, GGMLQuantizationType.F32)
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, array.astype(np.float16))
        elif qtype.name in K_QUANTS:
            w.add_tensor(name, kquantize(array, qtype.name), raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, short in _LAYER.items():
            array = tensors[f"model.layers.{i}.{hf_name}.weight"]
            if short == "attn_q":
                array = llama_cpp_permute(array, heads)
            elif short == "attn_k":
                array = llama_cpp_permute(array, kv_heads)
            add(f"blk.{i}.{short}.weight", array)
    add("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors:
        add("output.weight", tensors["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# -- K-quants: gguf-py dequantizes them but has no quantizer; this simple one (per-sub-block
# min/max, 6-bit or 4-bit sub-scales under a float16 super-scale) writes valid blocks whose values
# approximate the float weights, so test models built from them stay sane.
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def _asym(x: np.ndarray, sub: int, qmax: int, smax: int) -> tuple[np.ndarray, ...]:
    """x [n, 256] -> codes [n, 256], sub-scales and sub-mins [n, 256 // sub] (ints <= smax), d, dmin [n]."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    lo, hi = np.minimum(xs.min(-1), 0.0), xs.max(-1)
    scale, mins = (hi - lo) / qmax, -lo
    d = (scale.max(-1) / smax).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / smax).astype(np.float16).astype(np.float32)
    safe = lambda a: np.where(a == 0, 1.0, a)
    sc = np.clip(np.round(scale / safe(d)[:, None]), 0, smax)
    mc = np.clip(np.round(mins / safe(dmin)[:, None]), 0, smax)
    step = safe(d[:, None] * sc)[..., None]
    q = np.clip(np.round((xs + (dmin[:, None] * mc)[..., None]) / step), 0, qmax)
    return q.reshape(n, -1).astype(np.uint8), sc.astype(np.uint8), mc.astype(np.uint8), d, dmin


def _sym(x: np.ndarray, sub: int, half: int, smax: int) -> tuple[np.ndarray, ...]:
    """Symmetric: value = d * s * (q - half); codes [n, 256] in 0..2*half-1, sub-scales [n, 256 // sub] in 0..smax."""
    n = x.shape[0]
    xs = x.reshape(n, -1, sub)
    scale = np.abs(xs).max(-1) / half
    d = (scale.max(-1) / smax).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d == 0, 1.0, d)[:, None]), 0, smax)
    step = np.where(d[:, None] * sc == 0, 1.0, d[:, None] * sc)[..., None]
    q = np.clip(np.round(xs / step) + half, 0, 2 * half - 1)
    return q.reshape(n, -1).astype(np.uint8), sc.astype(np.uint8), d


def _pack_crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit codes [n, 256] -> 64 bytes: element h*128 + s*32 + j in bits 2s of byte h*32 + j."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """1-bit [n, 256] -> 32 bytes: element s*32 + j in bit s of byte j."""
    b = bits.reshape(-1, 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(b << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)


def _pack_nibbles(q: np.ndarray, groups: int, width: int) -> np.ndarray:
    """4-bit codes: group g's low nibbles are elements 2g*width.., its high nibbles the next width."""
    q = q.reshape(-1, groups, 2, width).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and mins in 12 bytes (the inverse of gguf-py's get_scale_min)."""
    d_ = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    m_ = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([d_, m_, md], axis=1).astype(np.uint8)


def kquantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """Float ``w [out, in]`` (``in`` a multiple of 256) as ggml ``qtype`` blocks, uint8 ``[out, row bytes]``."""
    out = w.shape[0]
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 256)
    if qtype == "Q2_K":
        q, sc, mc, d, dmin = _asym(x, 16, 3, 15)
        blocks = [sc | (mc << 4), _pack_crumbs(q), _f16_bytes(d), _f16_bytes(dmin)]
    elif qtype == "Q3_K":
        q, sc, d = _sym(x, 16, 4, 31)
        s6 = sc.astype(np.uint8) + 32  # stored with an offset of 32
        low = (s6[:, :8] & 15) | ((s6[:, 8:] & 15) << 4)
        high = s6 >> 4  # scale t*4 + k: bits 2t of byte k
        hs = high.reshape(-1, 4, 4)
        packed_high = hs[:, 0] | (hs[:, 1] << 2) | (hs[:, 2] << 4) | (hs[:, 3] << 6)
        blocks = [_pack_bits(q >> 2), _pack_crumbs(q & 3), low, packed_high, _f16_bytes(d)]
    elif qtype in ("Q4_K", "Q5_K"):
        q, sc, mc, d, dmin = _asym(x, 32, 15 if qtype == "Q4_K" else 31, 63)
        head = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mc)]
        if qtype == "Q4_K":
            blocks = [*head, _pack_nibbles(q, 4, 32)]
        else:
            blocks = [*head, _pack_bits(q >> 4), _pack_nibbles(q & 15, 4, 32)]
    elif qtype == "Q6_K":
        q, sc, d = _sym(x, 16, 32, 127)
        ql = _pack_nibbles(q & 15, 2, 64)
        qh = _pack_crumbs(q >> 4)
        blocks = [ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)]
    else:
        raise ValueError(f"not a K-quant: {qtype}")
    return np.concatenate(blocks, axis=1).reshape(out, -1)
