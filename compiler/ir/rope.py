"""RoPE numerics shared by the reference interpreter and the targets."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def inv_frequencies(attrs: Mapping[str, object]) -> np.ndarray:
    """Inverse frequencies (float64, ``rotary_dim // 2``), with Llama 3 scaling if set."""
    rot = int(attrs["rotary_dim"])  # type: ignore[call-overload]
    theta = float(attrs["theta"])  # type: ignore[arg-type]
    inv = 1.0 / theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    if attrs.get("scaling") == "llama3":
        factor = float(attrs["factor"])  # type: ignore[arg-type]
        low = float(attrs["low_freq_factor"])  # type: ignore[arg-type]
        high = float(attrs["high_freq_factor"])  # type: ignore[arg-type]
        old_ctx = float(attrs["original_max_position"])  # type: ignore[arg-type]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    return inv


def cos_sin(positions: np.ndarray, attrs: Mapping[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables ``[tokens, rotary_dim // 2]`` in float64."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_frequencies(attrs)[None, :]
    return np.cos(angles), np.sin(angles)


def apply_rope_numpy(x: np.ndarray, positions: np.ndarray, attrs: Mapping[str, object]) -> np.ndarray:
    """Rotate ``x [tokens, heads, head_dim]``; ``style`` half (NEOX/HF) or interleaved (GGML)."""
    rot = int(attrs["rotary_dim"])  # type: ignore[call-overload]
    cos, sin = cos_sin(positions, attrs)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    out = x.copy()
    if attrs["style"] == "half":
        a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
        out[..., : rot // 2] = a * cos - b * sin
        out[..., rot // 2 : rot] = b * cos + a * sin
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2] = a * cos - b * sin
        out[..., 1:rot:2] = b * cos + a * sin
    return out
