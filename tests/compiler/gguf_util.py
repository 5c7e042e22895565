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
