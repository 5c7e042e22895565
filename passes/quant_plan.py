"""Which precision each weight gets: a main scheme, a rule for embeddings/lm_head, overrides.

Scheme texts: ``none``/``fp32`` (keep float32), ``fp16``, ``bf16``, ``int8`` (per output
channel, symmetric), ``int4`` (group-wise; group size and symmetry from the plan's defaults),
or an explicit spec such as ``int4g64s`` / ``int8g32s`` (``s`` symmetric, ``a`` asymmetric).
Overrides are ``PATTERN=SCHEME`` with shell-style patterns over param names
(``layers.0.*=int8``, ``lm_head=fp16``); the last matching override wins.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from llmc.compiler.errors import LlmcError
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.quant_modes import FLOAT32_SCHEMES, QUANT_MODES
from llmc.passes.quant_rtn import per_channel_group

FLOAT_SCHEMES = {
    **dict.fromkeys(FLOAT32_SCHEMES, "float32"),
    **{alias: mode.dtype for mode in QUANT_MODES.values() if mode.dtype for alias in (mode.name, *mode.aliases)},
}
"""Float scheme spellings -> dtype, from the ``--quant`` table."""
HEAD_PARAMS = ("embed", "lm_head")


@dataclass(frozen=True)
class Scheme:
    """A weight precision: a float dtype, or integer bits with group size (None = per channel)."""

    dtype: str | None = None
    bits: int | None = None
    group: int | None = None
    symmetric: bool = True

    def spec_for(self, in_features: int, scale_dtype: str = "float16") -> QuantSpec:
        assert self.bits is not None
        group = self.group if self.group is not None else per_channel_group(in_features)
        return QuantSpec(self.bits, group, self.symmetric, scale_dtype)

    def describe(self) -> str:
        if self.dtype is not None:
            return self.dtype
        group = "ch" if self.group is None else str(self.group)
        return f"int{self.bits}g{group}{'s' if self.symmetric else 'a'}"

    @property
    def is_int(self) -> bool:
        return self.bits is not None


def parse_scheme(text: str, group: int = 32, symmetric: bool | None = None) -> Scheme:
    """A :class:`Scheme` from its text form; ``group``/``symmetric`` fill in plain ``int4``."""
    t = text.strip().lower()
    if t in FLOAT_SCHEMES:
        return Scheme(dtype=FLOAT_SCHEMES[t])
    if t == "int8":
        return Scheme(bits=8, group=None, symmetric=True if symmetric is None else symmetric)
    if t == "int4":
        if group <= 0 or group % 2:
            raise LlmcError(f"int4 group size must be even (32, 64 or 128 recommended), not {group}")
        return Scheme(bits=4, group=group, symmetric=False if symmetric is None else symmetric)
    try:
        spec = QuantSpec.parse(t)
    except ValueError as exc:
        raise LlmcError(
            f"unknown quantization scheme {text!r}; use none, fp16, bf16, int8, int4 or e.g. int4g64s"
        ) from exc
    return Scheme(bits=spec.bits, group=spec.group_size, symmetric=spec.symmetric)


def parse_overrides(items: list[str] | tuple[str, ...] | str | None, group: int = 32,
                    symmetric: bool | None = None) -> list[tuple[str, Scheme]]:
    """``["layers.0.*=int8", ...]`` (or one string joined by ``;``) into (pattern, scheme) pairs."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [p for p in items.replace(";", "\n").splitlines() if p.strip()]
    out: list[tuple[str, Scheme]] = []
    for item in items:
        pattern, sep, scheme = item.rpartition("=")
        if not sep or not pattern.strip():
            raise LlmcError(f"bad --quant-override {item!r}; expected PATTERN=SCHEME, e.g. 'layers.0.*=int8'")
        out.append((pattern.strip(), parse_scheme(scheme, group, symmetric)))
    return out


@dataclass
class QuantPlan:
    """Maps each 2-D param name to its :class:`Scheme`."""

    main: Scheme
    head: Scheme | None = None
    overrides: list[tuple[str, Scheme]] = field(default_factory=list)

    @classmethod
    def build(cls, scheme: str, group: int = 32, symmetric: bool | None = None, head: str | None = None,
              overrides: list[str] | tuple[str, ...] | str | None = None) -> QuantPlan:
        """The plan for ``--quant scheme``: int4 keeps embeddings/lm_head at int8 unless ``head`` says."""
        main = parse_scheme(scheme, group, symmetric)
        if head is not None:
            head_scheme: Scheme | None = parse_scheme(head, group, symmetric)
        else:
            head_scheme = parse_scheme("int8") if main.bits == 4 else None
        return cls(main, head_scheme, parse_overrides(overrides, group, symmetric))

    def scheme_for(self, name: str) -> Scheme:
        chosen = self.main
        if self.head is not None and name in HEAD_PARAMS:
            chosen = self.head
        for pattern, scheme in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                chosen = scheme
        return chosen

    def with_overrides(self, extra: list[tuple[str, Scheme]]) -> QuantPlan:
        return QuantPlan(self.main, self.head, [*self.overrides, *extra])

    def describe(self) -> dict[str, object]:
        return {
            "main": self.main.describe(),
            "head": None if self.head is None else self.head.describe(),
            "overrides": [f"{p}={s.describe()}" for p, s in self.overrides],
        }
