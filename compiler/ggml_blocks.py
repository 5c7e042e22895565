"""GGUF (ggml) quantized block formats kept as stored: their layout and an exact decode.

A ggml tensor ``[out, in]`` is stored row by row as blocks of ``block`` elements. Decoding a
block gives, for every element, an unsigned integer code ``u`` (``bits`` wide) and the value

* ``scale * (u - zero)`` for the symmetric formats (a fixed ``zero`` per format), or
* ``scale * u + offset`` for the others,

where ``scale`` and ``offset`` are constant over a sub-block of ``sub`` elements (32, or 16 for
Q2_K, Q3_K and Q6_K). :func:`decode` returns that form (:class:`Decoded`) and
:func:`dequantize` evaluates it in float32 in the same order as ``gguf.quants.dequantize``, so
the two agree bit for bit (tests check every format). The K-quants' sub-block scales are the
products of a float16 super-block scale and a small integer, exact in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockFormat:
    """One ggml block type."""

    name: str
    block: int
    """Elements per block."""
    nbytes: int
    """Bytes per block."""
    bits: int
    """Width of a decoded code."""
    sub: int
    """Elements sharing one scale (and offset)."""
    zero: int | None
    """``value = scale * (code - zero)`` when set; else ``value = scale * code + offset``."""
    scale_dtype: str
    """Dtype that holds every decoded scale exactly (``float16`` when they are the stored ones)."""

    @property
    def symmetric(self) -> bool:
        return self.zero is not None

    def row_bytes(self, inp: int) -> int:
        """Bytes of one stored row of ``inp`` elements."""
        if inp % self.block:
            raise ValueError(f"{self.name} rows hold whole blocks of {self.block}; a row of {inp} does not")
        return inp // self.block * self.nbytes


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q4_0", 32, 18, 4, 32, 8, "float16"),
    BlockFormat("Q4_1", 32, 20, 4, 32, None, "float16"),
    BlockFormat("Q5_0", 32, 22, 5, 32, 16, "float16"),
    BlockFormat("Q5_1", 32, 24, 5, 32, None, "float16"),
    BlockFormat("Q8_0", 32, 34, 8, 32, 128, "float16"),
    BlockFormat("Q2_K", 256, 84, 2, 16, None, "float32"),
    BlockFormat("Q3_K", 256, 110, 3, 16, 4, "float32"),
    BlockFormat("Q4_K", 256, 144, 4, 32, None, "float32"),
    BlockFormat("Q5_K", 256, 176, 5, 32, None, "float32"),
    BlockFormat("Q6_K", 256, 210, 6, 16, 32, "float32"),
)}
"""The ggml types llmc runs as stored (their names as in ``gguf.GGMLQuantizationType``)."""

LLMC_LAYOUT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
"""Types llmc's own group layout (:class:`~llmc.compiler.weights.QuantizedTensor` int4/int8) holds exactly."""


def block_format(name: str) -> BlockFormat:
    fmt = FORMATS.get(name.upper())
    if fmt is None:
        raise ValueError(f"ggml type {name!r} is not a block format llmc keeps; known: {', '.join(FORMATS)}")
    return fmt


@dataclass(frozen=True)
class Decoded:
    """Codes and sub-block scales of a ggml tensor (see the module docstring)."""

    fmt: BlockFormat
    codes: np.ndarray
    """uint8 ``[out, in]``."""
    scales: np.ndarray
    """``[out, in // sub]``, float16 or float32 (:attr:`BlockFormat.scale_dtype`)."""
    offsets: np.ndarray | None
    """Like ``scales`` for the asymmetric formats, else None."""


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)


def _nibbles(qs: np.ndarray, groups: int, width: int) -> np.ndarray:
    """ggml's nibble order: bytes ``[n, groups * width]``; group g's low nibbles are elements
    ``2g * width ...``, its high nibbles the next ``width`` elements."""
    q = qs.reshape(qs.shape[0], groups, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(qs.shape[0], -1)


def _crumbs(qs: np.ndarray, groups: int) -> np.ndarray:
    """2-bit fields: bytes ``[n, groups * 32]``; element ``g*128 + s*32 + j`` is bits ``2s`` of byte ``g*32 + j``."""
    q = qs.reshape(qs.shape[0], groups, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (q & np.uint8(3)).reshape(qs.shape[0], -1)


def _bits_of(mask: np.ndarray, count: int) -> np.ndarray:
    """Element ``s*32 + j`` is bit ``s`` of byte ``j`` of ``mask [n, 32]``."""
    q = mask.reshape(mask.shape[0], 1, 32) >> np.arange(count, dtype=np.uint8).reshape(1, count, 1)
    return (q & np.uint8(1)).reshape(mask.shape[0], -1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the eight 6-bit scales and mins packed in 12 bytes."""
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _decode_blocks(fmt: BlockFormat, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocks ``[n, nbytes]`` -> codes ``[n, block]``, scales and offsets ``[n, block // sub]``."""
    n = b.shape[0]
    name = fmt.name
    if name == "Q8_0":
        return b[:, 2:] ^ np.uint8(0x80), _f16(b[:, :2]), None
    if name in ("Q4_0", "Q4_1"):
        head = 2 if name == "Q4_0" else 4
        codes = _nibbles(b[:, head:], 1, 16)
        return codes, _f16(b[:, :2]), None if name == "Q4_0" else _f16(b[:, 2:4])
    if name in ("Q5_0", "Q5_1"):
        head = 2 if name == "Q5_0" else 4
        qh = np.ascontiguousarray(b[:, head:head + 4]).view(np.uint32)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)
        codes = _nibbles(b[:, head + 4:], 1, 16) | (high << np.uint8(4))
        return codes, _f16(b[:, :2]), None if name == "Q5_0" else _f16(b[:, 2:4])
    if name == "Q2_K":
        sc, qs = b[:, :16], b[:, 16:80]
        d, dmin = _f16(b[:, 80:82]).astype(np.float32), _f16(b[:, 82:84]).astype(np.float32)
        scales = d * (sc & 0xF).astype(np.float32)
        offsets = -(dmin * (sc >> 4).astype(np.float32))
        return _crumbs(qs, 2), scales, offsets
    if name == "Q3_K":
        hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
        d = _f16(b[:, 108:110]).astype(np.float32)
        shift4, shift2 = np.array([0, 4], dtype=np.uint8), np.array([0, 2, 4, 6], dtype=np.uint8)
        low = (packed[:, :8].reshape(n, 1, 8) >> shift4.reshape(1, 2, 1)).reshape(n, 16)
        high = (packed[:, 8:].reshape(n, 1, 4) >> shift2.reshape(1, 4, 1)).reshape(n, 16)
        sc = ((low & np.uint8(0x0F)) | ((high & np.uint8(0x03)) << np.uint8(4))).astype(np.int8) - np.int8(32)
        codes = _crumbs(qs, 2) | (_bits_of(hmask, 8) << np.uint8(2))
        return codes, d * sc.astype(np.float32), None
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]).astype(np.float32), _f16(b[:, 2:4]).astype(np.float32)
        sc, mn = _k_scale_min(b[:, 4:16])
        if name == "Q4_K":
            codes = _nibbles(b[:, 16:], 4, 32)
        else:
            codes = _nibbles(b[:, 48:], 4, 32) | (_bits_of(b[:, 16:48], 8) << np.uint8(4))
        return codes, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    if name == "Q6_K":
        ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8)
        d = _f16(b[:, 208:210]).astype(np.float32)
        codes = _nibbles(ql, 2, 64) | (_crumbs(qh, 2) << np.uint8(4))
        return codes, d * sc.astype(np.float32), None
    raise AssertionError(name)


def decode(raw: np.ndarray, fmt: BlockFormat, shape: tuple[int, int]) -> Decoded:
    """Codes and scales of a stored tensor ``raw`` (uint8 ``[out, row_bytes]`` or flat)."""
    out, inp = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out * (inp // fmt.block), fmt.nbytes)
    codes, scales, offsets = _decode_blocks(fmt, blocks)
    dtype = np.dtype(fmt.scale_dtype)
    scales = np.ascontiguousarray(scales, dtype=dtype).reshape(out, inp // fmt.sub)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets, dtype=dtype).reshape(out, inp // fmt.sub)
    return Decoded(fmt, np.ascontiguousarray(codes).reshape(out, inp), scales, offsets)


def dequantize_decoded(d: Decoded) -> np.ndarray:
    """The float32 weight ``[out, in]`` of decoded blocks (the order of ``gguf.quants``)."""
    out, inp = d.codes.shape
    codes = d.codes.reshape(out, inp // d.fmt.sub, d.fmt.sub)
    scales = d.scales.astype(np.float32)[..., None]
    if d.fmt.zero is not None:
        values = (codes.astype(np.int16) - np.int16(d.fmt.zero)).astype(np.float32)
        return (scales * values).reshape(out, inp)
    assert d.offsets is not None
    return (scales * codes.astype(np.float32) + d.offsets.astype(np.float32)[..., None]).reshape(out, inp)


def dequantize(raw: np.ndarray, fmt: BlockFormat, shape: tuple[int, int], rows: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[out, in]`` (or only ``rows`` of it), bit-identical to ``gguf.quants.dequantize``."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(shape[0], fmt.row_bytes(shape[1]))
    if rows is not None:
        raw = raw[np.asarray(rows)]
    return dequantize_decoded(decode(raw, fmt, (raw.shape[0], shape[1])))
