"""Round-to-nearest group quantizers producing :class:`QuantizedTensor` (NumPy, float32 math).

Scales (and offsets) are rounded to their storage dtype *before* the codes are computed, in
the direction that keeps every weight inside the representable range: symmetric scales round
up; asymmetric offsets round down and scales up. So for every element
``|w - dequantize(q)| <= scale / 2`` with the stored scale (up to float32 rounding).
"""

from __future__ import annotations

import numpy as np

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, pack_codes


def per_channel_group(in_features: int) -> int:
    """The group size that makes one group per output row (QuantSpec needs it even)."""
    return in_features + in_features % 2


def _grouped(w: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """``w [out, in]`` padded with NaN to ``[out, groups, group]`` (ragged last group)."""
    out, inp = w.shape
    groups = -(-inp // group)
    if inp == groups * group:
        return w.reshape(out, groups, group), groups
    padded = np.full((out, groups * group), np.nan, dtype=np.float32)
    padded[:, :inp] = w
    return padded.reshape(out, groups, group), groups


def _round_up(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` (non-negative float32) in ``dtype``, rounded so that the stored value >= x."""
    stored = x.astype(dtype)
    low = stored.astype(np.float32) < x
    if np.any(low):
        bumped = np.nextafter(stored[low], np.array(np.inf, dtype=dtype))
        stored[low] = bumped
    return stored


def _round_down(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    stored = x.astype(dtype)
    high = stored.astype(np.float32) > x
    if np.any(high):
        stored[high] = np.nextafter(stored[high], np.array(-np.inf, dtype=dtype))
    return stored


def rtn_codes(weight: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unpacked codes ``[out, in]`` (float32), stored-dtype scales and offsets (None if symmetric)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"only 2-D weights are quantized, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("cannot quantize a weight holding NaN or inf")
    out, inp = w.shape
    sdtype = NUMPY_DTYPES[spec.scale_dtype]
    qmax = 2**spec.bits - 1
    g, groups = _grouped(w, spec.group_size)
    ragged = groups * spec.group_size != inp
    amax = np.nanmax if ragged else np.max
    amin = np.nanmin if ragged else np.min
    offsets = None
    if spec.symmetric:
        half = 2 ** (spec.bits - 1) - 1  # codes - mid in [-half, half]
        absmax = amax(np.abs(g), axis=-1)
        scales = _round_up(absmax / half, sdtype)
        safe = np.where(scales > 0, scales.astype(np.float32), 1.0)[..., None]
        codes = np.clip(np.rint(g / safe) + 2 ** (spec.bits - 1), 0, qmax)
    else:
        offsets = _round_down(amin(g, axis=-1), sdtype)
        span = np.maximum(amax(g, axis=-1) - offsets.astype(np.float32), 0.0)
        scales = _round_up(span / qmax, sdtype)
        safe = np.where(scales > 0, scales.astype(np.float32), 1.0)[..., None]
        codes = np.clip(np.rint((g - offsets.astype(np.float32)[..., None]) / safe), 0, qmax)
    if ragged:
        codes = np.nan_to_num(codes, nan=0.0)
    codes = codes.reshape(out, groups * spec.group_size)[:, :inp]
    return codes, scales, offsets


def quantize_rtn(weight: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest quantization of a float ``[out, in]`` weight under ``spec``."""
    codes, scales, offsets = rtn_codes(weight, spec)
    qdata = pack_codes(codes.astype(np.uint8), spec.bits)
    return QuantizedTensor(spec, tuple(codes.shape), qdata, np.ascontiguousarray(scales),  # type: ignore[arg-type]
                           None if offsets is None else np.ascontiguousarray(offsets))


def fake_quantize(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``quantize_rtn(weight, spec).dequantize()`` without packing (for searches)."""
    codes, scales, offsets = rtn_codes(weight, spec)
    inp = codes.shape[1]
    s = np.repeat(scales.astype(np.float32), spec.group_size, axis=1)[:, :inp]
    if offsets is None:
        return s * (codes - float(2 ** (spec.bits - 1)))
    return s * codes + np.repeat(offsets.astype(np.float32), spec.group_size, axis=1)[:, :inp]


def quantization_error(weight: np.ndarray, qt: QuantizedTensor) -> float:
    """Relative Frobenius error ``||w - deq|| / ||w||`` (0 for an all-zero weight)."""
    w = np.asarray(weight, dtype=np.float32)
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - qt.dequantize(np.float32))) / norm if norm else 0.0
