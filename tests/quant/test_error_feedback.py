"""GPTQ-style error feedback on spectral factor rows, against a float64 textbook loop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.quant import quantizers as qz
from bitsmoe_jax.quant.error_feedback import component_hessian, compensate_rows, expert_input_hessians

E, R, F, G = 2, 24, 40, 16


def _row_q(row: np.ndarray, w: np.ndarray, b: int) -> np.ndarray:
    if b == 0:
        return np.zeros_like(row)
    if b == 16:
        return row.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)
    return np.asarray(qz.quantize_dequantize(jnp.asarray(row[None], jnp.float32), int(b), G, jnp.asarray(w[None], jnp.float32)))[0]


def _textbook(units, bits, hess, weights, damp=0.01):
    """Plain float64 GPTQ over rows in ascending-bit order; returns the rows as quantized (compensated)."""
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
    units = rng.normal(size=(E, R, F)).astype(np.float32) * np.linspace(2.0, 0.2, R)[None, :, None].astype(np.float32)
    bits = rng.choice([0, 1, 2, 3, 4, 8, 16], size=(E, R))
    weights = rng.gamma(2.0, size=(E, R, F)).astype(np.float32)
    return units, bits, hess, weights, z


def test_matches_float64_textbook(problem):
    units, bits, hess, weights, _ = problem
    got = compensate_rows(units, bits, hess, G, weights)
    ref = _textbook(units, bits, hess, weights)
    # float32 vs float64 arithmetic: a value on a rounding boundary may flip one grid step, so
    # compare overall, and require nearly every entry to agree closely.
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-3, rel
    assert np.isclose(got, ref, rtol=1e-3, atol=1e-4).mean() > 0.98


def test_lowers_output_error_against_nearest(problem):
    units, bits, hess, weights, z = problem
    comp = compensate_rows(units, bits, hess, G, weights)
    for e in range(E):
        q_near = np.stack([_row_q(units[e][k], weights[e][k], int(bits[e][k])) for k in range(R)])
        q_fb = np.stack([_row_q(comp[e][k], weights[e][k], int(bits[e][k])) for k in range(R)])
        err_near = np.sum((z[e] @ (units[e] - q_near)) ** 2)
        err_fb = np.sum((z[e] @ (units[e] - q_fb)) ** 2)
        assert err_fb < 0.7 * err_near, (e, err_fb, err_near)


def test_identity_hessian_changes_nothing(problem):
    units, bits, _, weights, _ = problem
    eye = np.broadcast_to(np.eye(R, dtype=np.float32), (E, R, R))
    np.testing.assert_array_equal(compensate_rows(units, bits, eye, G, weights), units)


def test_zero_bit_rows_fold_into_later_rows():
    """With two perfectly correlated components, dropping one moves its content into the other."""
    z = np.random.default_rng(1).normal(size=(200, 1))
    zz = np.concatenate([z, z], axis=1)  # component 0 and 1 always equal
    hess = (zz.T @ zz)[None].astype(np.float32)
    units = np.array([[[1.0, -2.0, 0.5, 3.0]], [[0.5, 1.0, -1.0, 2.0]]], np.float32).reshape(1, 2, 4)
    out = compensate_rows(units, np.array([[0, 16]]), hess, 4, damp=1e-6)
    np.testing.assert_allclose(out[0, 1], units[0, 0] + units[0, 1], rtol=1e-3, atol=1e-3)


def test_shape_errors():
    with pytest.raises(ValueError, match="hessian must be"):
        compensate_rows(np.zeros((1, 3, 4), np.float32), np.ones((1, 3), int), np.zeros((1, 2, 2), np.float32), 4)


def test_expert_input_hessians_against_token_loop():
    rng = np.random.default_rng(2)
    n, d, e = 80, 6, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    idx = np.stack([rng.choice(3, size=n, replace=True), np.full(n, 3)], axis=1)  # expert 3: every token
    idx[:, 0] = np.where(idx[:, 0] == 3, 0, idx[:, 0])
    idx[0, 0] = 2  # expert 2: keep at least one token
    idx[:, 0] = np.where((idx[:, 0] == 2) & (np.arange(n) > 3), 1, idx[:, 0])  # expert 2 starved (< 16)
    w = rng.uniform(0.1, 1.0, size=(n, 2)).astype(np.float32)
    got = expert_input_hessians(jnp.asarray(x), idx, w, e, min_tokens=16)
    for ex in range(e):
        ref = np.zeros((d, d))
        for t in range(n):
            for j in range(2):
                if idx[t, j] == ex:
                    ref += float(w[t, j]) ** 2 * np.outer(x[t], x[t])
        if ex == 2:  # starved: all tokens, scaled to the mean routed mass of the others
            mass = [sum(float(w[t, j]) ** 2 for t in range(n) for j in range(2) if idx[t, j] == o) for o in (0, 1, 3)]
            ref = np.asarray(x, np.float64).T @ x * (np.mean(mass) / n)
        np.testing.assert_allclose(got[ex], ref, rtol=1e-4, atol=1e-4)


def test_component_hessian_is_projection():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 5, 5)).astype(np.float32)
    v = rng.normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_allclose(component_hessian(h, v), np.stack([v.T @ hh @ v for hh in h]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(component_hessian(h, None), h)
