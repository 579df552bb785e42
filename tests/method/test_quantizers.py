"""Unit quantizers against plain numpy loops, brute-force scale search and hand-computed counts."""

from __future__ import annotations

import math

import jax
import ml_dtypes
import numpy as np
import pytest

from bitsmoe_jax.method import quantizers as qz

INT_BITS = list(range(1, 9))


def _bf16(v: float) -> float:
    return float(np.float32(v).astype(ml_dtypes.bfloat16).astype(np.float32))


def _ref_codes(x: np.ndarray, s: float, b: int) -> np.ndarray:
    lo, hi = -(2 ** (b - 1)), 2 ** (b - 1) - 1
    if s <= 0:
        return np.zeros(x.shape, np.int64)
    y = x.astype(np.float32) / np.float32(2.0 * s)
    return np.clip(np.floor(y), lo, hi).astype(np.int64)


def _ref_err(x: np.ndarray, w: np.ndarray, q: np.ndarray, s: float) -> float:
    r = x.astype(np.float64) - (2.0 * q + 1.0) * s
    return float(np.sum(w * r * r))


def _ref_group(x: np.ndarray, w: np.ndarray, b: int) -> tuple[np.ndarray, float]:
    """One group, written as a plain loop over candidate scales (the documented algorithm)."""
    s_max = float(np.float32(np.abs(x).max()) / np.float32(2**b - 1))
    factors = np.linspace(1.0, qz._GRID_MIN_FACTOR[b], qz._GRID_SIZE, dtype=np.float32)
    best_s, best_e = None, math.inf
    for f in factors:
        s = _bf16(np.float32(s_max) * f)
        e = _ref_err(x, w, _ref_codes(x, s, b), s)
        if e < best_e:
            best_s, best_e = s, e
    for _ in range(qz._REFINE_STEPS):
        m = 2.0 * _ref_codes(x, best_s, b) + 1.0
        den = float(np.sum(w * m * m))
        s = max(float(np.sum(w * x * m)) / den, 0.0) if den > 0 else best_s
        s = _bf16(s)
        e = _ref_err(x, w, _ref_codes(x, s, b), s)
        if e < best_e:
            best_s, best_e = s, e
    return _ref_codes(x, best_s, b), best_s


def _ref_unit(x: np.ndarray, w: np.ndarray | None, b: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.ones_like(x, dtype=np.float64) if w is None else w.astype(np.float64)
    codes, scales = [], []
    for start in range(0, x.shape[0], g):
        q, s = _ref_group(x[start : start + g], w[start : start + g], b)
        codes.append(q)
        scales.append(s)
    return np.concatenate(codes), np.array(scales)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((6, 200)).astype(np.float32)
    heavy = rng.standard_t(3, size=(6, 200)).astype(np.float32)
    x = np.concatenate([gauss, heavy])
    w = rng.gamma(0.5, size=x.shape).astype(np.float32)
    return {"x": x, "w": w}


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_numpy_loop(data, bits, weighted):
    x = data["x"]
    w = data["w"] if weighted else None
    g = 64  # n = 200 -> groups of 64, 64, 64 and a ragged 8
    codes, scales = qz.quantize_codes(x, bits, g, w)
    codes, scales = np.asarray(codes), np.asarray(scales)
    assert codes.shape == x.shape and scales.shape == (x.shape[0], 4)
    same_scale = 0
    for i in range(x.shape[0]):
        rq, rs = _ref_unit(x[i], None if w is None else w[i], bits, g)
        same_scale += int(np.sum(rs == scales[i]))
        wi = np.ones(x.shape[1]) if w is None else w[i].astype(np.float64)
        ours = _ref_err(x[i], wi, codes[i], np.repeat(scales[i], g)[: x.shape[1]])
        ref = _ref_err(x[i], wi, rq, np.repeat(rs, g)[: x.shape[1]])
        # float32 vs float64 error sums may break a near-tie differently; errors must agree.
        assert ours == pytest.approx(ref, rel=1e-4, abs=1e-9)
        where_same = np.repeat(rs == scales[i], g)[: x.shape[1]]
        np.testing.assert_array_equal(codes[i][where_same], rq[where_same])
    assert same_scale >= 0.9 * scales.size


def test_one_bit_is_sign_times_weighted_mean_abs(data):
    x, w = data["x"], data["w"]
    codes, scales = qz.quantize_codes(x, 1, 50, w)
    codes, scales = np.asarray(codes), np.asarray(scales)
    np.testing.assert_array_equal(codes, np.where(x >= 0, 0, -1))
    xg, wg = x.reshape(12, 4, 50).astype(np.float64), w.reshape(12, 4, 50).astype(np.float64)
    expect = (wg * np.abs(xg)).sum(-1) / wg.sum(-1)
    np.testing.assert_allclose(scales, expect, rtol=2**-8)
    xh = np.asarray(qz.dequantize_codes(codes, scales, 1, 50))
    np.testing.assert_array_equal(np.abs(xh), np.repeat(scales, 50, axis=1))
    np.testing.assert_array_equal(np.sign(xh), np.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("bits", range(2, 9))
def test_search_never_worse_than_max_abs(data, bits):
    x, w = data["x"], data["w"]
    g = 64
    for weights in (None, w):
        xh = np.asarray(qz.quantize_dequantize(x, bits, g, weights)).astype(np.float64)
        ww = np.ones_like(x, np.float64) if weights is None else weights.astype(np.float64)
        s_max = np.repeat(qz.max_abs_scales(x, bits, g), g, axis=1)[:, : x.shape[1]]
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = np.clip(np.floor(x / (2 * s_max)), lo, hi)
        ref = (2 * q + 1) * s_max
        ours_e = (ww * (x - xh) ** 2).reshape(12, -1)
        ref_e = (ww * (x - ref) ** 2).reshape(12, -1)
        # group by group (pad to 4 groups of 64)
        pad = 4 * g - x.shape[1]
        og = np.pad(ours_e, ((0, 0), (0, pad))).reshape(12, 4, g).sum(-1)
        rg = np.pad(ref_e, ((0, 0), (0, pad))).reshape(12, 4, g).sum(-1)
        assert np.all(og <= rg * (1 + 1e-5) + 1e-12)
        if bits <= 4:
            assert og.sum() < 0.95 * rg.sum()  # the search must actually buy something


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_search_close_to_dense_brute_force(bits):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 128)).astype(np.float32)
    xh = np.asarray(qz.quantize_dequantize(x, bits, 128)).astype(np.float64)
    ours = ((x - xh) ** 2).sum(-1)
    s_max = np.abs(x).max(-1, keepdims=True) / (2**bits - 1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best = np.full(40, np.inf)
    for f in np.linspace(0.05, 1.2, 1500):
        s = (s_max * f).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        q = np.clip(np.floor(x / (2 * s)), lo, hi)
        best = np.minimum(best, ((x - (2 * q + 1) * s) ** 2).sum(-1))
    assert np.all(ours >= best * (1 - 1e-6))
    assert np.mean(ours / best - 1) < 2e-3
    assert np.max(ours / best - 1) < 2e-2


def test_mid_rise_beats_mid_tread_at_two_bits():
    """The documented reason for the code convention, checked on Gaussian data."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 128)).astype(np.float32)
    ours = float(((x - np.asarray(qz.quantize_dequantize(x, 2, 128))) ** 2).sum())
    amax = np.abs(x).max(-1, keepdims=True)
    tread = np.inf
    for f in np.linspace(0.2, 1.0, 200):  # best single factor for the grid {-2,-1,0,1}·s
        s = amax * f / 2
        tread = min(tread, float(((x - np.clip(np.round(x / s), -2, 1) * s) ** 2).sum()))
    assert ours < 0.85 * tread


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 8, 16])
def test_round_trip_is_exact(data, bits):
    x, w = data["x"], data["w"]
    codes, scales = qz.quantize_codes(x, bits, 64, w)
    a = np.asarray(qz.quantize_dequantize(x, bits, 64, w))
    b = np.asarray(qz.dequantize_codes(codes, scales, bits, 64))
    np.testing.assert_array_equal(a, b)
    codes = np.asarray(codes)
    assert codes.dtype == np.int32
    if bits in INT_BITS:
        lo, hi = qz.code_range(bits)
        assert codes.min() >= lo and codes.max() <= hi
        sc = np.asarray(scales)
        np.testing.assert_array_equal(sc, sc.astype(ml_dtypes.bfloat16).astype(np.float32))
    # the same under an outer jit
    jitted = jax.jit(lambda v: qz.quantize_dequantize(v, bits, 64))
    np.testing.assert_array_equal(
        np.asarray(jitted(x)), np.asarray(qz.quantize_dequantize(x, bits, 64))
    )


def test_zero_and_sixteen_bits(data):
    x = data["x"]
    np.testing.assert_array_equal(np.asarray(qz.quantize_dequantize(x, 0)), 0.0)
    xh = np.asarray(qz.quantize_dequantize(x, 16))
    np.testing.assert_array_equal(xh, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    codes, scales = qz.quantize_codes(x, 16)
    np.testing.assert_array_equal(
        np.asarray(codes), x.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.int32)
    )
    assert np.asarray(scales).shape == (x.shape[0], 0)


def test_groups_are_independent_and_zero_groups_are_safe():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    x[1, 32:64] = 0.0
    y = x.copy()
    y[:, 64:] *= 7.0
    for b in (1, 2, 4):
        cx, sx = (np.asarray(a) for a in qz.quantize_codes(x, b, 32))
        cy, sy = (np.asarray(a) for a in qz.quantize_codes(y, b, 32))
        np.testing.assert_array_equal(cx[:, :64], cy[:, :64])
        np.testing.assert_array_equal(sx[:, :2], sy[:, :2])
        xh = np.asarray(qz.dequantize_codes(cx, sx, b, 32))
        assert np.all(np.isfinite(xh))
        np.testing.assert_array_equal(xh[1, 32:64], 0.0)


@pytest.mark.parametrize("n", [1, 5, 127, 128, 129])
def test_short_and_ragged_units(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)).astype(np.float32)
    for b in (1, 3, 8):
        codes, scales = qz.quantize_codes(x, b, 128)
        assert np.asarray(scales).shape == (3, qz.num_groups(n, 128))
        xh = np.asarray(qz.dequantize_codes(codes, scales, b, 128))
        rq, rs = zip(*(_ref_unit(x[i], None, b, 128) for i in range(3)), strict=False)
        ref = np.stack(
            [(2.0 * q + 1.0) * np.repeat(s, 128)[:n] for q, s in zip(rq, rs, strict=False)]
        )
        np.testing.assert_allclose(
            ((x - xh) ** 2).sum(-1), ((x - ref) ** 2).sum(-1), rtol=1e-4, atol=1e-10
        )


def test_unit_errors_weighted(data):
    x, w = data["x"], data["w"]
    cand = (0, 1, 2, 3, 4, 6, 8, 16)
    err = np.asarray(qz.unit_errors(x, cand, 64, w))
    assert err.shape == (x.shape[0], len(cand))
    for j, b in enumerate(cand):
        xh = np.asarray(qz.quantize_dequantize(x, b, 64, w)).astype(np.float64)
        expect = (w.astype(np.float64) * (x - xh) ** 2).sum(-1)
        np.testing.assert_allclose(err[:, j], expect, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(
        err[:, 0], (w.astype(np.float64) * x.astype(np.float64) ** 2).sum(-1), rtol=1e-5
    )
    # More bits never cost more error on average, and the weights steer the scale search.
    assert np.all(np.diff(err.sum(0)) < 0)
    unweighted = np.asarray(qz.quantize_dequantize(x, 2, 64)).astype(np.float64)
    err_unw = (w * (x - unweighted) ** 2).sum()
    assert err[:, 2].sum() < 0.97 * err_unw


def test_unit_errors_leading_batch_dims(data):
    cand = (0, 1, 2, 3, 4, 6, 8, 16)
    x, w = data["x"], data["w"]
    a = np.asarray(qz.unit_errors(x.reshape(3, 4, 200), cand, 64, w.reshape(3, 4, 200)))
    b = np.asarray(qz.unit_errors(x, cand, 64, w)).reshape(3, 4, len(cand))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_kappa_estimates():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((512, 128)) * rng.lognormal(0, 1, size=(512, 1))).astype(np.float32)
    x[7] = 0.0  # zero-norm unit: no information, must be ignored
    w = rng.random((512, 128)).astype(np.float32)
    cand = (0, 1, 2, 4)
    # every unit, in chunks of 64 (one compiled shape for the whole test)
    err = np.concatenate(
        [
            np.asarray(qz.unit_errors(x[i : i + 64], cand, 128, w[i : i + 64]))
            for i in range(0, 512, 64)
        ]
    )
    norm = (w.astype(np.float64) * x.astype(np.float64) ** 2).sum(-1)
    ratio = err.astype(np.float64) / np.where(norm > 0, norm, 1.0)[:, None]
    # asking for more samples than units uses every unit exactly once
    k_all = np.asarray(qz.kappa_estimates(x[:64], cand, 128, w[:64], num_samples=10_000))
    np.testing.assert_allclose(k_all, ratio[:64][norm[:64] > 0].mean(0), rtol=1e-5)
    assert k_all[0] == pytest.approx(1.0)
    # a sample of 64 out of 512 estimates the population mean
    k_some = np.asarray(qz.kappa_estimates(x, cand, 128, w, num_samples=64, seed=1))
    np.testing.assert_allclose(k_some, ratio[norm > 0].mean(0), rtol=0.1)
    est = np.asarray(qz.estimated_errors(x, k_some, w))
    np.testing.assert_allclose(est, norm[:, None] * k_some[None, :], rtol=1e-5)
    with pytest.raises(ValueError, match="zero weighted norm"):
        qz.kappa_estimates(np.zeros((4, 128), np.float32), cand, 128, num_samples=4)


def test_stored_bits_formula():
    assert qz.stored_bits(768, 0) == 0
    assert qz.stored_bits(768, 16) == 768 * 16
    assert qz.stored_bits(768, 2, 128) == 768 * 2 + 6 * 16
    assert qz.stored_bits(768, 1, 128) == 768 + 6 * 16
    assert qz.stored_bits(768, 3, 128, scalar_bits=16) == 768 * 3 + 6 * 16 + 16
    assert qz.stored_bits(768, 4, 128, scale_bits=8) == 768 * 4 + 6 * 8
    # 200 values: 7 words of 32 per bit-plane (224 slots) and 4 groups of 64
    assert qz.stored_bits(200, 3, 64) == 224 * 3 + 4 * 16
    assert qz.stored_bits(1, 8, 128) == 32 * 8 + 16
    with pytest.raises(ValueError):
        qz.stored_bits(10, 9)
    with pytest.raises(ValueError):
        qz.quantize_codes(np.zeros((1, 4), np.float32), 9)
