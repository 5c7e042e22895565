"""The op set: one :class:`OpDef` per op, with its attributes and type rule.

The type rule both infers result types (for the builder) and checks operands (for the
verifier): it raises :class:`TypeCheckError` with a message the verifier prefixes with the
node. Fused ops are part of the same table; a target declares which ones it lowers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmc.compiler.ir.rope import ROPE_ATTRS, ROPE_OPTIONAL, ROPE_STYLES
from llmc.compiler.ir.types import KV_CACHE_TYPE, Dim, TensorType

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INDEX_DTYPES = ("int64", "int32")


class TypeCheckError(ValueError):
    """An operand has the wrong rank, dtype or size for its op."""


Attrs = dict[str, object]
TypeRule = Callable[[Sequence[TensorType], Attrs], tuple[TensorType, ...]]


@dataclass(frozen=True)
class OpDef:
    """Definition of one op."""

    name: str
    doc: str
    num_inputs: int
    attrs: tuple[str, ...]
    infer: TypeRule
    optional_attrs: tuple[str, ...] = ()
    side_effect: bool = False
    fused: bool = False


def _float(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeCheckError(f"{what} must be a float tensor, got {t}")


def _index(t: TensorType, what: str) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeCheckError(f"{what} must be an int64/int32 tensor, got {t}")


def _rank(t: TensorType, rank: int, what: str) -> None:
    if t.rank != rank:
        raise TypeCheckError(f"{what} must have rank {rank}, got {t}")


def _same_dim(a: Dim, b: Dim, what: str) -> None:
    if a != b:
        raise TypeCheckError(f"{what}: {a} != {b}")


def _kv(t: TensorType) -> None:
    if t != KV_CACHE_TYPE:
        raise TypeCheckError(f"last operand must be the kv cache, got {t}")


def _embedding(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    table, ids = ins
    _rank(table, 2, "embedding table")
    _rank(ids, 1, "token ids")
    _index(ids, "token ids")
    return (TensorType((ids.shape[0], table.shape[1]), str(attrs["dtype"])),)


def _rms_norm(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    x, w = ins
    _float(x, "input")
    _rank(w, 1, "norm weight")
    _same_dim(x.shape[-1], w.shape[0], "norm weight size")
    return (x,)


def _add_rms_norm(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    x, residual, w = ins
    if x != residual:
        raise TypeCheckError(f"residual operands differ: {x} vs {residual}")
    _rms_norm([x, w], attrs)
    return (x, x)


def _linear(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    x, w = ins
    _float(x, "input")
    _rank(x, 2, "input")
    _rank(w, 2, "weight")
    _same_dim(x.shape[1], w.shape[1], "input features vs weight [out, in]")
    return (TensorType((x.shape[0], w.shape[0]), x.dtype),)


def _split(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    (x,) = ins
    sizes = tuple(int(s) for s in attrs["sizes"])  # type: ignore[attr-defined]
    _rank(x, 2, "input")
    if not isinstance(x.shape[1], int) or sum(sizes) != x.shape[1]:
        raise TypeCheckError(f"split sizes {sizes} do not add up to {x.shape[1]}")
    return tuple(TensorType((x.shape[0], s), x.dtype) for s in sizes)


def _split_heads(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    (x,) = ins
    heads, head_dim = int(attrs["heads"]), int(attrs["head_dim"])  # type: ignore[call-overload]
    _rank(x, 2, "input")
    _same_dim(x.shape[1], heads * head_dim, "features vs heads*head_dim")
    return (TensorType((x.shape[0], heads, head_dim), x.dtype),)


def _merge_heads(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    (x,) = ins
    _rank(x, 3, "input")
    h, d = x.shape[1], x.shape[2]
    if not (isinstance(h, int) and isinstance(d, int)):
        raise TypeCheckError(f"heads and head dim must be concrete, got {x}")
    return (TensorType((x.shape[0], h * d), x.dtype),)


def _rope(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    x, pos = ins
    _rank(x, 3, "input")
    _float(x, "input")
    _index(pos, "positions")
    _same_dim(x.shape[0], pos.shape[0], "tokens vs positions")
    _rope_settings(attrs, x.shape[2])
    return (x,)


def _rope_settings(attrs: Attrs, head_dim: Dim) -> None:
    if attrs["style"] not in ROPE_STYLES:
        raise TypeCheckError(f"rope style must be 'half' or 'interleaved', got {attrs['style']!r}")
    rot = int(attrs["rotary_dim"])  # type: ignore[call-overload]
    if rot <= 0 or rot % 2 or rot > int(head_dim):
        raise TypeCheckError(f"rotary_dim {rot} does not fit head dim {head_dim}")


def _check_attention(q: TensorType, k: TensorType, v: TensorType) -> None:
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        _rank(t, 3, what)
        _float(t, what)
    if k != v:
        raise TypeCheckError(f"k and v differ: {k} vs {v}")
    _same_dim(q.shape[0], k.shape[0], "q tokens vs k tokens")
    _same_dim(q.shape[2], k.shape[2], "q head dim vs k head dim")
    hq, hkv = q.shape[1], k.shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int)) or hq % hkv:
        raise TypeCheckError(f"query heads {hq} must be a multiple of kv heads {hkv}")


def _attention(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    q, k, v, kv = ins
    _check_attention(q, k, v)
    _kv(kv)
    return (q,)


def _rope_attention(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    q, k, v, pos, kv = ins
    _check_attention(q, k, v)
    _rope([q, pos], attrs)
    _kv(kv)
    return (q,)


def _packed_rope_attention(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    qkv, pos, kv = ins
    _rank(qkv, 2, "packed qkv")
    _float(qkv, "packed qkv")
    _index(pos, "positions")
    _same_dim(qkv.shape[0], pos.shape[0], "tokens vs positions")
    heads, kv_heads, head_dim = (int(attrs[k]) for k in ("heads", "kv_heads", "head_dim"))  # type: ignore[call-overload]
    if heads <= 0 or kv_heads <= 0 or head_dim <= 0 or heads % kv_heads:
        raise TypeCheckError(f"query heads {heads} must be a positive multiple of kv heads {kv_heads}")
    _same_dim(qkv.shape[1], (heads + 2 * kv_heads) * head_dim, "packed width vs (heads + 2 kv_heads) * head_dim")
    _rope_settings(attrs, head_dim)
    _kv(kv)
    return (TensorType((qkv.shape[0], heads, head_dim), qkv.dtype),)


def _unary(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    (x,) = ins
    _float(x, "input")
    return (x,)


def _binary(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    a, b = ins
    if a != b:
        raise TypeCheckError(f"operands differ: {a} vs {b}")
    _float(a, "input")
    return (a,)


def _swiglu(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    (x,) = ins
    _rank(x, 2, "input")
    width = x.shape[1]
    if not isinstance(width, int) or width % 2:
        raise TypeCheckError(f"swiglu input width must be even, got {x}")
    return (TensorType((x.shape[0], width // 2), x.dtype),)


def _gather_rows(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    x, idx = ins
    _rank(x, 2, "input")
    _rank(idx, 1, "indices")
    _index(idx, "indices")
    return (TensorType((idx.shape[0], x.shape[1]), x.dtype),)


def _no_infer(ins: Sequence[TensorType], attrs: Attrs) -> tuple[TensorType, ...]:
    raise TypeCheckError("inputs and params take their type from the function or module")


OPS: dict[str, OpDef] = {
    d.name: d
    for d in (
        OpDef("input", "a function argument", 0, ("name",), _no_infer),
        OpDef("param", "a named weight of the module", 0, ("name",), _no_infer),
        OpDef("embedding", "rows of a table selected by token ids", 2, ("dtype",), _embedding),
        OpDef("rms_norm", "x / rms(x) * w", 2, ("eps",), _rms_norm),
        OpDef("linear", "x @ w.T (w is [out, in], possibly quantized)", 2, (), _linear),
        OpDef("split", "split the last dim into parts of the given sizes", 1, ("sizes",), _split),
        OpDef("split_heads", "[t, h*d] -> [t, h, d]", 1, ("heads", "head_dim"), _split_heads),
        OpDef("merge_heads", "[t, h, d] -> [t, h*d]", 1, (), _merge_heads),
        OpDef("rope", "rotary position embedding", 2, ROPE_ATTRS, _rope, ROPE_OPTIONAL),
        OpDef(
            "attention",
            "causal GQA attention over the kv cache (appends k, v)",
            4,
            ("layer", "scale"),
            _attention,
            side_effect=True,
        ),
        OpDef("silu", "x * sigmoid(x)", 1, (), _unary),
        OpDef("mul", "a * b", 2, (), _binary),
        OpDef("add", "a + b", 2, (), _binary),
        OpDef("gather_rows", "x[idx]", 2, (), _gather_rows),
        OpDef(
            "add_rms_norm",
            "(rms_norm(x + r) * w, x + r)",
            3,
            ("eps",),
            _add_rms_norm,
            fused=True,
        ),
        OpDef("swiglu", "silu(x[:, :f]) * x[:, f:]", 1, (), _swiglu, fused=True),
        OpDef(
            "rope_attention",
            "attention with rope applied to q and k inside",
            5,
            ("layer", "scale", *ROPE_ATTRS),
            _rope_attention,
            ROPE_OPTIONAL,
            side_effect=True,
            fused=True,
        ),
        OpDef(
            "packed_rope_attention",
            "rope_attention reading q, k, v from one packed [tokens, (heads + 2 kv_heads) * head_dim] tensor",
            3,
            ("layer", "scale", "heads", "kv_heads", "head_dim", *ROPE_ATTRS),
            _packed_rope_attention,
            ROPE_OPTIONAL,
            side_effect=True,
            fused=True,
        ),
    )
}

BASE_OPS = frozenset(name for name, d in OPS.items() if not d.fused)
FUSED_OPS = frozenset(name for name, d in OPS.items() if d.fused)
