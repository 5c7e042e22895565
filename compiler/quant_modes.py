"""The ``--quant`` modes: one table that the CLI, the compile driver, the ``quantize`` pass and
each target's capabilities read.

A mode is either a precision the ``quantize`` pass produces (a float cast or integer codes),
or one of the two modes that run no pass: ``none`` keeps the weights as loaded (a GGUF's
quantized blocks dequantized to float32) and ``native`` keeps a GGUF's blocks as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.errors import LlmcError


@dataclass(frozen=True)
class QuantMode:
    """One ``--quant`` value."""

    name: str
    doc: str
    dtype: str | None = None
    """Float dtype the matrices are cast to (float modes)."""
    bits: int | None = None
    """Code width of integer modes."""
    aliases: tuple[str, ...] = ()
    """Other spellings accepted in quantization schemes (``--quant-override lm_head=float16``)."""

    @property
    def runs_pass(self) -> bool:
        """Whether this mode is the ``quantize`` pass (else no weight changes at compile time)."""
        return self.dtype is not None or self.bits is not None


QUANT_MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("none", "keep weights as loaded (a GGUF's quantized blocks dequantized to float32)"),
    QuantMode("fp16", "cast weight matrices to float16", dtype="float16", aliases=("float16",)),
    QuantMode("bf16", "cast weight matrices to bfloat16", dtype="bfloat16", aliases=("bfloat16",)),
    QuantMode("int8", "8-bit codes per output channel (symmetric unless --asym)", bits=8),
    QuantMode("int4", "4-bit codes in groups of --group-size (asymmetric unless --sym; AWQ with --calib-file)",
              bits=4),
    QuantMode("native", "keep a GGUF's quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K) as stored "
                        "(the default for a GGUF source)"),
)}
PASS_MODES = tuple(name for name, mode in QUANT_MODES.items() if mode.runs_pass)
"""The modes the ``quantize`` pass implements."""
FLOAT32_SCHEMES = ("none", "fp32", "float32")
"""Scheme spellings that keep (or restore) float32 in quantization plans and overrides."""


def default_quant(is_gguf: bool) -> str:
    """The mode a compile gets without ``--quant``: a GGUF keeps its blocks, anything else its weights."""
    return "native" if is_gguf else "none"


def quant_mode(name: str) -> QuantMode:
    """The mode called ``name``; a clear error listing the modes otherwise."""
    mode = QUANT_MODES.get(name)
    if mode is None:
        raise LlmcError(f"unknown --quant {name!r}; choose from {', '.join(QUANT_MODES)}")
    return mode
