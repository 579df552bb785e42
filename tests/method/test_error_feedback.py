"""GPTQ-style error feedback on spectral factors (rows for gate/up, columns for down), against
float64
textbook loops; packing reproduces the feedback's rounding; a quantized layer's output error
drops."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.method import quantizers as qz
from bitsmoe_jax.method.error_feedback import (
    ROW_BLOCK,
    CalibrationInputs,
    compensate_columns,
    compensate_rows,
)
from bitsmoe_jax.method.packing import dequantize_packed, pack_segments

E, R, F, G = 2, 24, 40, 16


def _row_q(row: np.ndarray, w: np.ndarray, b: int) -> np.ndarray:
    if b == 0:
        return np.zeros_like(row)
    if b == 16:
        return row.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)
    return np.asarray(
        qz.quantize_dequantize(
            jnp.asarray(row[None], jnp.float32), int(b), G, jnp.asarray(w[None], jnp.float32)
        )
    )[0]


def _textbook(units, bits, hess, weights, damp=0.01):
    """Plain float64 GPTQ over rows in ascending-bit order; returns the rows as quantized
    (compensated)."""
    out = np.empty_like(units, dtype=np.float64)
    for e in range(units.shape[0]):
        order = np.argsort(bits[e], kind="stable")
        a = units[e][order].astype(np.float64)
        h = hess[e][np.ix_(order, order)].astype(np.float64)
        h[np.diag_indices_from(h)] = np.where(np.diag(h) <= 0, 1.0, np.diag(h))
        h = h + damp * np.mean(np.diag(h)) * np.eye(len(order))
        u = np.linalg.cholesky(np.linalg.inv(h)).T
        for i in range(len(order)):
            q = _row_q(a[i], weights[e][order[i]], int(bits[e][order[i]]))
            err = (a[i] - q) / u[i, i]
            a[i + 1 :] -= np.outer(u[i, i + 1 :], err)
        out[e][order] = a
    return out


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    mix = np.eye(R) + 0.8 * rng.normal(size=(R, R)) / np.sqrt(R)
    z = [rng.normal(size=(300, R)) @ mix * np.exp(rng.normal(0, 0.7, size=R)) for _ in range(E)]
    hess = np.stack([zz.T @ zz for zz in z]).astype(np.float32)
    units = rng.normal(size=(E, R, F)).astype(np.float32) * np.linspace(2.0, 0.2, R)[
        None, :, None
    ].astype(np.float32)
    bits = rng.choice([0, 1, 2, 3, 4, 8, 16], size=(E, R))
    weights = rng.gamma(2.0, size=(E, R, F)).astype(np.float32)
    return units, bits, hess, weights, z


@pytest.mark.parametrize(
    "block", [ROW_BLOCK, 8, 5]
)  # one block; 3 blocks; 5 blocks, the last padded by one row
def test_matches_float64_textbook(problem, block):
    units, bits, hess, weights, _ = problem
    got = np.stack(
        [compensate_rows(units[e], bits[e], hess[e], G, weights[e], block=block) for e in range(E)]
    )
    ref = _textbook(units, bits, hess, weights)
    # float32 vs float64 arithmetic: a value on a rounding boundary may flip one grid step, so
    # compare overall, and require nearly every entry to agree closely.
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-3, rel
    assert np.isclose(got, ref, rtol=1e-3, atol=1e-4).mean() > 0.98


def test_lowers_output_error_against_nearest(problem):
    units, bits, hess, weights, z = problem
    comp = np.stack([compensate_rows(units[e], bits[e], hess[e], G, weights[e]) for e in range(E)])
    for e in range(E):
        q_near = np.stack([_row_q(units[e][k], weights[e][k], int(bits[e][k])) for k in range(R)])
        q_fb = np.stack([_row_q(comp[e][k], weights[e][k], int(bits[e][k])) for k in range(R)])
        err_near = np.sum((z[e] @ (units[e] - q_near)) ** 2)
        err_fb = np.sum((z[e] @ (units[e] - q_fb)) ** 2)
        assert err_fb < 0.7 * err_near, (e, err_fb, err_near)


def test_identity_hessian_changes_nothing(problem):
    units, bits, _, weights, _ = problem
    for e in range(E):
        np.testing.assert_array_equal(
            compensate_rows(units[e], bits[e], np.eye(R, dtype=np.float32), G, weights[e]), units[e]
        )


def test_zero_bit_rows_fold_into_later_rows():
    """With two perfectly correlated components, dropping one moves its content into the other."""
    z = np.random.default_rng(1).normal(size=(200, 1))
    zz = np.concatenate([z, z], axis=1)  # component 0 and 1 always equal
    hess = (zz.T @ zz).astype(np.float32)
    units = np.array([[1.0, -2.0, 0.5, 3.0], [0.5, 1.0, -1.0, 2.0]], np.float32)
    out = compensate_rows(units, np.array([0, 16]), hess, 4, damp=1e-6)
    np.testing.assert_allclose(out[1], units[0] + units[1], rtol=1e-3, atol=1e-3)


def test_shape_errors():
    with pytest.raises(ValueError, match="hessian must be"):
        compensate_rows(
            np.zeros((3, 4), np.float32), np.ones(3, int), np.zeros((2, 2), np.float32), 4
        )
    with pytest.raises(ValueError, match="hessian must be"):
        compensate_columns(
            np.zeros((3, 4), np.float32), np.ones(3, int), np.zeros((3, 3), np.float32), 4
        )


def _textbook_columns(units, bits, hess, weights, g, damp=0.01):
    """Plain float64 GPTQ over columns with groups: scales (one per row) fixed at each group's
    start."""
    a = units.astype(np.float64).copy()
    r, f = a.shape
    h = hess.astype(np.float64).copy()
    h[np.diag_indices_from(h)] = np.where(np.diag(h) <= 0, 1.0, np.diag(h))
    h = h + damp * np.mean(np.diag(h)) * np.eye(f)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    vals = np.zeros_like(a)
    scales = np.zeros((r, -(-f // g)))
    for f0 in range(0, f, g):
        for k in range(r):
            if 1 <= bits[k] <= 8:
                _, s = qz.quantize_codes(
                    jnp.asarray(a[k, f0 : f0 + g][None], jnp.float32),
                    int(bits[k]),
                    g,
                    jnp.asarray(weights[k, f0 : f0 + g][None], jnp.float32),
                )
                scales[k, f0 // g] = float(np.asarray(s)[0, 0])
        for j in range(f0, min(f0 + g, f)):
            x = a[:, j].copy()
            vals[:, j] = x
            q = np.zeros(r)
            for k in range(r):
                if bits[k] == 16:
                    q[k] = float(np.float32(x[k]).astype(jnp.bfloat16))
                elif bits[k] >= 1 and scales[k, f0 // g] > 0:
                    lo, hi = qz.code_range(int(bits[k]))
                    s = scales[k, f0 // g]
                    q[k] = (2 * np.clip(np.floor(x[k] / (2 * s)), lo, hi) + 1) * s
            err = (x - q) / u[j, j]
            a[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    return vals, scales


@pytest.fixture(scope="module")
def column_problem():
    rng = np.random.default_rng(4)
    f, r = 40, 12
    # Strongly correlated hidden activations, as an expert's are (condition numbers of 1e6 are
    # usual).
    hid = (
        rng.normal(size=(400, 6)) @ rng.normal(size=(6, f)) + 0.1 * rng.normal(size=(400, f))
    ) * np.exp(rng.normal(0, 0.5, size=f))
    hess = (hid.T @ hid).astype(np.float32)
    units = rng.normal(size=(r, f)).astype(np.float32)
    bits = np.array([0, 1, 2, 3, 4, 8, 16, 2, 2, 3, 1, 4])
    # The down loss weights are the Hessian's diagonal (c_down[f] = Σ_t w_t² h_tf²).
    weights = np.broadcast_to(np.diag(hess), (r, f)).copy()
    return units, bits, hess, weights, hid


@pytest.mark.parametrize("g", [16, 40, 64])
def test_columns_match_float64_textbook(column_problem, g):
    units, bits, hess, weights, _ = column_problem
    vals, scales = compensate_columns(units, bits, hess, g, weights)
    ref_vals, ref_scales = _textbook_columns(units, bits, hess, weights, min(g, units.shape[1]))
    assert scales.shape == ref_scales.shape
    assert (
        np.isclose(scales, ref_scales, rtol=1e-2).mean() > 0.95
    )  # bf16 scales: an ulp flip is allowed
    rel = np.linalg.norm(vals - ref_vals) / np.linalg.norm(ref_vals)
    assert rel < 2e-2, rel


def test_columns_pack_reproduces_and_lowers_error(column_problem):
    units, bits, hess, weights, hid = column_problem
    g = 16
    vals, scales = compensate_columns(units, bits, hess, g, weights)
    fed = np.asarray(dequantize_packed(pack_segments(vals, bits, g, weights, scales=scales)))
    near = np.asarray(dequantize_packed(pack_segments(units, bits, g, weights)))
    # Packing on the returned scales rounds each compensated value on its group's scale (numpy
    # here).
    step = np.repeat(scales, g, axis=1)[:, : units.shape[1]].astype(np.float64)
    for k in range(units.shape[0]):
        if 1 <= bits[k] <= 8:
            lo, hi = qz.code_range(int(bits[k]))
            safe = np.where(step[k] > 0, step[k], 1.0)
            expect = np.where(
                step[k] > 0,
                (2 * np.clip(np.floor(vals[k] / (2 * safe)), lo, hi) + 1) * step[k],
                0.0,
            )
            np.testing.assert_allclose(fed[k], expect, rtol=1e-6, atol=1e-7)
        elif bits[k] == 0:
            assert np.all(fed[k] == 0)
    ints = (bits >= 1) & (bits <= 8)
    # Error on the rows that are rounded (a 0-bit row's error is the row itself, whatever the
    # rounding).
    err_fb = np.sum((hid @ (units - fed)[ints].T) ** 2)
    err_near = np.sum((hid @ (units - near)[ints].T) ** 2)
    assert err_fb < 0.8 * err_near, (err_fb, err_near)


def test_token_weights_and_starved_fallback():
    idx = np.array([[0, 1], [0, 2], [1, 2], [0, 1]] * 5, np.int32)  # expert 3 never routed
    w = np.tile(np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]], np.float32), (5, 1))
    c = CalibrationInputs(np.zeros((20, 3), np.float32), idx, w, min_tokens=4)
    np.testing.assert_allclose(
        c.token_weights(0), np.where((idx == 0).any(1), np.where(idx == 0, w, 0).sum(1), 0) ** 2
    )
    starved = c.token_weights(3)
    masses = [float((np.where(idx == e, w, 0).sum(1) ** 2).sum()) for e in (0, 1, 2)]
    np.testing.assert_allclose(starved, np.full(20, np.mean(masses) / 20), rtol=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        CalibrationInputs(np.zeros((5, 3), np.float32), idx, w)
