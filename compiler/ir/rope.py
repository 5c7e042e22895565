"""The one description of RoPE: the attributes ``rope`` and ``rope_attention`` nodes carry
(:data:`ROPE_ATTRS`, :data:`ROPE_OPTIONAL`), the setting they describe (:class:`RopeSpec`) and
its numerics, shared by the reference interpreter and every target.

Two styles rotate pairs of the first ``rotary_dim`` dims of each head: ``half`` (NEOX/HF)
rotates ``(x[i], x[i + r/2])``, ``interleaved`` (GGML/Meta) rotates ``(x[2i], x[2i+1])``, by the
angle ``position * inv_freq[i]``; ``scaling="llama3"`` rescales the frequencies (Llama 3.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

ROPE_ATTRS = ("theta", "style", "rotary_dim")
"""Attributes every rope-applying node carries."""
ROPE_OPTIONAL = ("scaling", "factor", "low_freq_factor", "high_freq_factor", "original_max_position")
"""Frequency-scaling attributes, present only when scaling is set (``scaling="llama3"``)."""
ROPE_KEYS = ROPE_ATTRS + ROPE_OPTIONAL
ROPE_STYLES = ("half", "interleaved")


def rope_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE attributes among a node's ``attrs``, as they are (for a node built from another)."""
    return {k: v for k, v in attrs.items() if k in ROPE_KEYS}


def inv_frequencies(attrs: Mapping[str, object]) -> np.ndarray:
    """Inverse frequencies (float64, ``rotary_dim // 2``) of ``theta``/``rotary_dim`` and the optional
    Llama 3 scaling attributes (``style`` is not needed)."""
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


@dataclass(frozen=True)
class RopeSpec:
    """One RoPE setting, read from a node's attributes. Frozen and hashable: targets key their
    cos/sin tables by it, and two nodes rotate alike exactly when their specs are equal."""

    theta: float
    style: str
    rotary_dim: int
    scaling: str | None = None
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position: float | None = None

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> RopeSpec:
        """The spec of a ``rope``/``rope_attention`` node's attributes (other attributes are ignored)."""
        optional = {k: (attrs[k] if k == "scaling" else float(attrs[k])) for k in ROPE_OPTIONAL
                    if attrs.get(k) is not None}
        return cls(float(attrs["theta"]), str(attrs["style"]), int(attrs["rotary_dim"]), **optional)

    def attrs(self) -> dict[str, Any]:
        """The node attributes of this spec (optional ones only when set)."""
        out: dict[str, Any] = {"theta": self.theta, "style": self.style, "rotary_dim": self.rotary_dim}
        out |= {k: getattr(self, k) for k in ROPE_OPTIONAL if getattr(self, k) is not None}
        return out

    @property
    def half(self) -> bool:
        """True for the ``half`` (rotate-half) style, False for ``interleaved``."""
        return self.style == "half"

    def inv_frequencies(self) -> np.ndarray:
        """Inverse frequencies, float64 ``[rotary_dim // 2]``."""
        return inv_frequencies(self.attrs())

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin tables ``[tokens, rotary_dim // 2]`` in float64 (for positions ``0..n-1``:
        the tables a target precomputes for a context of ``n``)."""
        angles = np.asarray(positions, dtype=np.float64)[:, None] * self.inv_frequencies()[None, :]
        return np.cos(angles), np.sin(angles)

    def apply(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate ``x [tokens, heads, head_dim]`` (NumPy, in ``x``'s dtype): the reference numerics."""
        rot = self.rotary_dim
        cos, sin = self.cos_sin(positions)
        cos = cos[:, None, :].astype(x.dtype)
        sin = sin[:, None, :].astype(x.dtype)
        out = x.copy()
        if self.half:
            a, b = x[..., : rot // 2], x[..., rot // 2 : rot]
            out[..., : rot // 2] = a * cos - b * sin
            out[..., rot // 2 : rot] = b * cos + a * sin
        else:
            a, b = x[..., 0:rot:2], x[..., 1:rot:2]
            out[..., 0:rot:2] = a * cos - b * sin
            out[..., 1:rot:2] = b * cos + a * sin
        return out
