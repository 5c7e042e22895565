"""Round-to-nearest quantizers against a plain loop-by-loop NumPy reference; packing; error bounds."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, pack_codes, unpack_codes
from llmc.passes.quant_rtn import fake_quantize, per_channel_group, quantize_rtn

SCALE_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _store(x: float, dtype: type, up: bool) -> float:
    """``x`` in ``dtype``, stepped one ulp at a time until it is >= x (up) or <= x (down)."""
    v = np.array(x, dtype=np.float32).astype(dtype)
    while (float(v) < x) if up else (float(v) > x):
        v = np.nextafter(v, np.array(np.inf if up else -np.inf, dtype=dtype))
    return float(v)


def reference_quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [out, in], scales and offsets computed one group at a time with Python loops."""
    out, inp = w.shape
    g = spec.group_size
    groups = -(-inp // g)
    sdt = SCALE_DTYPES[spec.scale_dtype]
    qmax = 2**spec.bits - 1
    mid = 2 ** (spec.bits - 1)
    codes = np.zeros((out, inp), dtype=np.uint8)
    scales = np.zeros((out, groups), dtype=np.float32)
    offsets = None if spec.symmetric else np.zeros((out, groups), dtype=np.float32)
    for r in range(out):
        for j in range(groups):
            vals = w[r, j * g : (j + 1) * g].astype(np.float32)
            if spec.symmetric:
                s = _store(float(np.float32(np.abs(vals).max()) / np.float32(mid - 1)), sdt, up=True)
                q = np.full(vals.shape, mid) if s == 0 else np.clip(np.rint(vals / np.float32(s)) + mid, 0, qmax)
            else:
                lo = _store(float(vals.min()), sdt, up=False)
                span = max(float(np.float32(vals.max()) - np.float32(lo)), 0.0)
                s = _store(float(np.float32(span) / np.float32(qmax)), sdt, up=True)
                shifted = vals - np.float32(lo)
                q = np.zeros(vals.shape) if s == 0 else np.clip(np.rint(shifted / np.float32(s)), 0, qmax)
                assert offsets is not None
                offsets[r, j] = lo
            scales[r, j] = s
            codes[r, j * g : (j + 1) * g] = q.astype(np.uint8)
    return codes, scales, offsets


@st.composite
def weights_and_specs(draw: st.DrawFn) -> tuple[np.ndarray, QuantSpec]:
    bits = draw(st.sampled_from([4, 8]))
    group = draw(st.sampled_from([2, 4, 8, 16, 32]))
    out = draw(st.integers(1, 6))
    inp = 2 * draw(st.integers(1, 40))
    sym = draw(st.booleans())
    scale_dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, inp)) * magnitude).astype(np.float32)
    if draw(st.booleans()):
        w[:, : min(inp, group)] = 0.0  # an all-zero group
    if draw(st.booleans()):
        w += np.float32(draw(st.sampled_from([-2.0, 3.5])) * magnitude)  # groups away from zero
    return w, QuantSpec(bits, group, sym, scale_dtype)


@given(weights_and_specs())
def test_rtn_matches_the_loop_reference(case: tuple[np.ndarray, QuantSpec]) -> None:
    w, spec = case
    qt = quantize_rtn(w, spec)
    codes, scales, offsets = reference_quantize(w, spec)
    np.testing.assert_array_equal(qt.unpacked(), codes)
    np.testing.assert_array_equal(qt.scales.astype(np.float32), scales)
    if offsets is None:
        assert qt.offsets is None
    else:
        assert qt.offsets is not None
        np.testing.assert_array_equal(qt.offsets.astype(np.float32), offsets)


@given(weights_and_specs())
def test_rtn_error_is_at_most_half_a_step(case: tuple[np.ndarray, QuantSpec]) -> None:
    w, spec = case
    qt = quantize_rtn(w, spec)
    deq = qt.dequantize(np.float32)
    step = np.repeat(qt.scales.astype(np.float32), spec.group_size, axis=1)[:, : w.shape[1]]
    slack = 1e-6 * np.maximum(np.abs(w), step) + 1e-30
    assert np.all(np.abs(w - deq) <= step / 2 + slack)
    np.testing.assert_array_equal(fake_quantize(w, spec), deq)


@given(st.integers(1, 5), st.integers(1, 20), st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows: int, half_cols: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 16, size=(rows, 2 * half_cols), dtype=np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (rows, half_cols) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, 4), codes)


def test_packing_layout_low_nibble_is_the_even_index() -> None:
    codes = np.array([[1, 2, 15, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 4), np.array([[0x21, 0x0F]], dtype=np.uint8))
    w = np.array([[-8.0, -7.0, 6.0, 7.0]], dtype=np.float32)  # symmetric int4, scale 1 (absmax 8 / 7 -> codes)
    qt = quantize_rtn(w, QuantSpec(4, 4, True, "float32"))
    assert qt.qdata.shape == (1, 2)
    np.testing.assert_array_equal(unpack_codes(qt.qdata, 4)[0] & 0x0F, qt.unpacked()[0])
    assert int(qt.qdata[0, 0]) & 0x0F == int(qt.unpacked()[0, 0])
    assert int(qt.qdata[0, 0]) >> 4 == int(qt.unpacked()[0, 1])


def test_int8_per_channel_has_one_group_per_row() -> None:
    w = np.random.default_rng(0).standard_normal((5, 33)).astype(np.float32)
    spec = QuantSpec(8, per_channel_group(33), True)
    qt = quantize_rtn(w, spec)
    assert qt.scales.shape == (5, 1)
    assert np.abs(qt.dequantize() - w).max() <= qt.scales.astype(np.float32).max() / 2 + 1e-6
    np.testing.assert_allclose(qt.scales[:, 0].astype(np.float32), np.abs(w).max(1) / 127, rtol=1e-3)


def test_ragged_last_group() -> None:
    w = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    qt = quantize_rtn(w, QuantSpec(4, 32, False))
    assert qt.scales.shape == (3, 2)
    assert isinstance(qt, QuantizedTensor)
    codes, _, _ = reference_quantize(w, QuantSpec(4, 32, False))
    np.testing.assert_array_equal(qt.unpacked(), codes)


def test_rejects_non_finite_and_non_matrix() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize_rtn(np.array([[np.nan, 1.0]], dtype=np.float32), QuantSpec(8, 2, True))
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.ones(4, dtype=np.float32), QuantSpec(8, 2, True))
