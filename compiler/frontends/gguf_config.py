"""A GGUF file's metadata as llmc's :class:`ModelConfig` (``general.architecture`` and ``llama.*``).

GGUF ``llama`` Q/K weights are stored permuted for adjacent-pair ("interleaved") RoPE, so the
config says ``rope_style="interleaved"`` and the weights are kept exactly as stored.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGUFReader

from llmc.compiler.config import MAX_DIMENSION, MAX_POSITION, ModelConfig, RopeScaling
from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.frontends.gguf_reader import Metadata
from llmc.compiler.frontends.gguf_tensors import ROPE_FREQS, T

SUPPORTED_ARCHITECTURES = ("llama",)


def parse_config(meta: Metadata, reader: GGUFReader) -> ModelConfig:
    """Model config from ``general.architecture`` and the ``llama.*`` keys (types and ranges checked:
    errors name the key)."""
    arch = meta.require_string("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{meta.path}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    p = f"{arch}."

    def size(key: str, default: int | None = None) -> int:
        if default is None:
            return meta.require_integer(p + key, minimum=1, maximum=MAX_DIMENSION)
        return meta.integer(p + key, default, minimum=1, maximum=MAX_DIMENSION) or default

    hidden = size("embedding_length")
    heads = size("attention.head_count")
    head_dim = size("attention.key_length", max(1, hidden // heads))
    tensors = {t.name: t for t in reader.tensors}
    vocab = meta.integer(p + "vocab_size", minimum=1, maximum=MAX_DIMENSION)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens.data)
        elif "token_embd.weight" in tensors:
            vocab = int(tensors["token_embd.weight"].shape[-1])
        else:
            raise InputError(f"{meta.path}: no {p}vocab_size, tokenizer.ggml.tokens or token_embd.weight")
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = meta.integer(key, minimum=0)
        if value is not None and value not in eos_ids:
            eos_ids.append(value)
    theta = meta.number(p + "rope.freq_base", positive=True) or 10000.0
    rotary = meta.integer(p + "rope.dimension_count", minimum=0, maximum=MAX_DIMENSION)
    rotary = head_dim if rotary is None else rotary
    try:
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=size("feed_forward_length"),
            num_layers=size("block_count"),
            num_heads=heads,
            num_kv_heads=size("attention.head_count_kv", heads),
            head_dim=head_dim,
            max_position=meta.require_integer(p + "context_length", minimum=1, maximum=MAX_POSITION),
            rms_norm_eps=meta.require_number(p + "attention.layer_norm_rms_epsilon", positive=True),
            rope_theta=theta,
            rope_scaling=_rope_scaling(meta, p, tensors, theta, rotary),
            rope_style="interleaved",
            rotary_dim=rotary,
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", minimum=0),
            eos_token_ids=tuple(eos_ids),
        )
    except InputError as exc:
        if str(exc).startswith(str(meta.path)):
            raise
        raise InputError(f"{meta.path}: {exc}") from exc


def _rope_scaling(meta: Metadata, p: str, tensors: dict[str, Any], theta: float, rot: int) -> RopeScaling | None:
    kind = meta.string(p + "rope.scaling.type")
    if kind is None and p + "rope.scale_linear" in meta:
        kind = "linear"
    if kind not in (None, "none"):
        factor = meta.number(p + "rope.scaling.factor", meta.number(p + "rope.scale_linear"))
        if kind == "linear" and factor is not None and float(factor) == 1.0:
            kind = "none"
        else:
            raise UnsupportedError(
                f"{meta.path}: RoPE scaling type {kind!r} is not supported (supported: none, and Llama 3 "
                f"frequency factors in {ROPE_FREQS})"
            )
    if ROPE_FREQS not in tensors:
        return None
    # Llama 3.x: llama.cpp stores the llama3 scaling as per-frequency divisors.
    t = tensors[ROPE_FREQS]
    if t.tensor_type != T.F32:
        raise UnsupportedError(f"{meta.path}: {ROPE_FREQS} has type {t.tensor_type.name}, expected F32")
    return fit_llama3_scaling(np.asarray(t.data, dtype=np.float64).reshape(-1), theta, rot, str(meta.path))


def fit_llama3_scaling(factors: np.ndarray, theta: float, rotary_dim: int, where: str) -> RopeScaling | None:
    """The llama3 scaling that reproduces llama.cpp's ``rope_freqs`` divisors (checked, else an error).

    llama3 divides a frequency by ``factor`` below a band, keeps it above, and in between blends
    with ``smooth = (ctx / wavelen - low) / (high - low)``, a line in ``1 / wavelen``. The line is
    fitted through the in-band divisors (or placed between the bands when fewer than two are in
    band); ``ctx``, ``low`` and ``high`` are then read off the line.
    """
    from llmc.compiler.ir.rope import inv_frequencies

    if factors.shape != (rotary_dim // 2,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} must hold {rotary_dim // 2} positive factors")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    u = inv / (2 * math.pi)  # 1 / wavelen
    low_band = factors >= factor * (1 - 1e-6)
    high_band = factors <= 1 + 1e-6
    medium = ~(low_band | high_band)
    smooth = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    u_low = u[low_band].max() if low_band.any() else 0.0
    u_high = u[high_band].min() if high_band.any() else 2 * u.max()
    if medium.sum() >= 2:
        a, c = np.polyfit(u[medium], smooth[medium], 1)
    elif medium.sum() == 1:
        um, sm = float(u[medium][0]), float(smooth[medium][0])
        a = 2 * max(sm / (um - u_low), (1 - sm) / (u_high - um))
        c = sm - a * um
    else:
        a = 2.0 / (u_high - u_low)
        c = -0.5 - a * u_low
    if not (np.isfinite(a) and np.isfinite(c) and a > 0 and c < 0 and a / -c < 2**31):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} does not follow Llama 3 RoPE scaling; it is not supported")
    old_ctx = max(1, round(a / -c))  # low == 1 when the line allows an integer context
    span = old_ctx / a
    low = -c * span
    scaling = RopeScaling(factor=factor, low_freq_factor=float(low), high_freq_factor=float(low + span),
                          original_max_position=int(old_ctx))
    attrs = {"rotary_dim": rotary_dim, "theta": theta, "scaling": "llama3", "factor": scaling.factor,
             "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
             "original_max_position": scaling.original_max_position}
    if not np.allclose(inv / inv_frequencies(attrs), factors, rtol=1e-5, atol=0):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} does not follow Llama 3 RoPE scaling; it is not supported")
    return scaling
