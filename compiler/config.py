"""The model config every front end produces and every later layer reads."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from llmc.compiler.errors import InputError

MAX_POSITION = 1 << 20
"""The longest context llmc compiles or loads (1,048,576 tokens). Tables sized by the context
(RoPE cos/sin, a full-context KV cache) grow with it, so a corrupt or absurd context length
(2^40) is refused here, naming the key, instead of failing in an allocator at run time."""

MAX_DIMENSION = 1 << 24
"""Upper bound of every other size (vocab, hidden, heads, layers): far above any real model."""


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int

    def __post_init__(self) -> None:
        problems = []
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _is_number(value) or float(value) <= 0:
                problems.append(f"rope_scaling.{name} must be a positive number, got {value!r}")
            else:
                object.__setattr__(self, name, float(value))
        if not _is_int(self.original_max_position) or not 0 < int(self.original_max_position) <= MAX_POSITION:
            problems.append(f"rope_scaling.original_max_position must be an integer in [1, {MAX_POSITION}], "
                            f"got {self.original_max_position!r}")
        if not problems and self.high_freq_factor <= self.low_freq_factor:
            problems.append(f"rope_scaling.high_freq_factor {self.high_freq_factor} must be above "
                            f"low_freq_factor {self.low_freq_factor}")
        if problems:
            raise InputError("invalid model config: " + "; ".join(problems))


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (checked on construction: types, ranges, shapes)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_style: str = "half"
    rotary_dim: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "llama"

    def __post_init__(self) -> None:
        problems = []
        for name in _SIZES:
            value = getattr(self, name)
            if not _is_int(value):
                problems.append(f"{name} must be an integer, got {value!r}")
            elif not 0 < int(value) <= MAX_DIMENSION:
                problems.append(f"{name} must be in [1, {MAX_DIMENSION}], got {value}")
            else:
                object.__setattr__(self, name, int(value))
        if not _is_int(self.max_position):
            problems.append(f"max_position must be an integer, got {self.max_position!r}")
        elif not 0 < int(self.max_position) <= MAX_POSITION:
            problems.append(f"max_position (the context length) must be in [1, {MAX_POSITION}], "
                            f"got {self.max_position}")
        else:
            object.__setattr__(self, "max_position", int(self.max_position))
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or float(value) <= 0:
                problems.append(f"{name} must be a positive number, got {value!r}")
            else:
                object.__setattr__(self, name, float(value))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            problems.append(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.architecture, str):
            problems.append(f"architecture must be a string, got {self.architecture!r}")
        if self.bos_token_id is not None and not (_is_int(self.bos_token_id) and self.bos_token_id >= 0):
            problems.append(f"bos_token_id must be a non-negative integer or null, got {self.bos_token_id!r}")
        eos = self.eos_token_ids
        if not isinstance(eos, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in eos):
            problems.append(f"eos_token_ids must be a list of non-negative integers, got {eos!r}")
        else:
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in eos))
        if self.rope_style not in ("half", "interleaved"):
            problems.append(f"rope_style must be 'half' or 'interleaved', got {self.rope_style!r}")
        if not _is_int(self.rotary_dim) or self.rotary_dim < 0:
            problems.append(f"rotary_dim must be a non-negative integer, got {self.rotary_dim!r}")
        if problems:
            raise InputError("invalid model config: " + "; ".join(problems))
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            problems.append(f"rotary_dim {self.rotary_dim} does not fit head_dim {self.head_dim}")
        if problems:
            raise InputError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """The config of :meth:`to_dict` (an artifact's manifest ``model``); wrong keys or types raise
        :class:`InputError`."""
        if not isinstance(data, dict):
            raise InputError(f"model config must be an object, got {type(data).__name__}")
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"model config has unknown keys {sorted(unknown)}")
        missing = [f.name for f in fields(cls) if f.name in (*_SIZES, "max_position") and f.name not in data]
        if missing:
            raise InputError(f"model config lacks {', '.join(missing)}")
        scaling = data.get("rope_scaling")
        if scaling:
            if not isinstance(scaling, dict) or set(scaling) != {f.name for f in fields(RopeScaling)}:
                raise InputError(f"model config rope_scaling must be an object with "
                                 f"{', '.join(f.name for f in fields(RopeScaling))}, got {scaling!r}")
            data["rope_scaling"] = RopeScaling(**scaling)
        else:
            data["rope_scaling"] = None
        eos = data.get("eos_token_ids") or ()
        data["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else eos
        return cls(**data)

    @property
    def param_count(self) -> int:
        h, f, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * f + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers * per_layer + h + head
