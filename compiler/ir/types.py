"""Value types of the IR: tensors with symbolic dims, and quantized weight specs."""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str
"""A dimension: a concrete size or a symbolic name such as ``"tokens"`` or ``"batch"``."""

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "int8", "kvcache")


@dataclass(frozen=True)
class QuantSpec:
    """Group-wise weight-only quantization of a 2-D weight ``[out, in]``.

    Dequantized value: ``w = scale[o, g] * (q - 2**(bits-1))`` when ``symmetric`` and
    ``w = scale[o, g] * q + offset[o, g]`` otherwise, with ``q`` unsigned ``bits``-bit
    integers and ``g = i // group_size``. 4-bit values are packed two per byte along the
    input dim, the low nibble holding the even index. This one form holds llmc's own
    INT8/INT4 schemes and GGUF's Q8_0, Q4_0 and Q4_1 blocks exactly.

    With ``ggml`` set (a name of :data:`llmc.compiler.ggml_blocks.FORMATS`, e.g. ``"Q4_K"``)
    the weight is a GGUF tensor kept in its own block format instead: see
    :meth:`for_ggml`; ``bits``, ``group_size`` and ``symmetric`` then describe that format.
    """

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: str = "float16"
    ggml: str | None = None

    @classmethod
    def for_ggml(cls, name: str) -> QuantSpec:
        """The spec of ggml block type ``name``: its code width, block size and symmetry."""
        from llmc.compiler.ggml_blocks import block_format

        fmt = block_format(name)
        return cls(fmt.bits, fmt.block, fmt.symmetric, "float16", fmt.name)

    def __post_init__(self) -> None:
        if self.ggml is not None:
            from llmc.compiler.ggml_blocks import block_format

            fmt = block_format(self.ggml)
            if (self.bits, self.group_size, self.symmetric, self.scale_dtype, self.ggml) != (
                    fmt.bits, fmt.block, fmt.symmetric, "float16", fmt.name):
                raise ValueError(f"not the spec of ggml type {fmt.name}: {self}")
            return
        if self.bits not in (4, 8):
            raise ValueError(f"quantized weights have 4 or 8 bits, not {self.bits}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group size must be a positive even number, not {self.group_size}")
        if self.scale_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"scale dtype {self.scale_dtype!r} is not a float type")

    def describe(self) -> str:
        """Short text form, e.g. ``int4g32a`` (``a`` asymmetric, ``s`` symmetric), ``ggml_q4_k``."""
        if self.ggml is not None:
            return f"ggml_{self.ggml.lower()}"
        return f"int{self.bits}g{self.group_size}{'s' if self.symmetric else 'a'}"

    @classmethod
    def parse(cls, text: str, scale_dtype: str = "float16") -> QuantSpec:
        """Inverse of :meth:`describe`."""
        if text.startswith("ggml_"):
            return cls.for_ggml(text[5:].upper())
        if not (text.startswith("int") and "g" in text and text[-1] in "sa"):
            raise ValueError(f"not a quant spec: {text!r}")
        bits, group = text[3:-1].split("g")
        return cls(int(bits), int(group), text[-1] == "s", scale_dtype)


@dataclass(frozen=True)
class TensorType:
    """Shape and element type of an IR value."""

    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        if self.dtype == "kvcache":
            return "kvcache"
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


KV_CACHE_TYPE = TensorType((), "kvcache")
