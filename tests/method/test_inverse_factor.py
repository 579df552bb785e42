"""`upper_inverse_cholesky` against the float64 textbook route (explicit inverse, then Cholesky)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.method.inverse_factor import upper_inverse_cholesky


def _hessian(n: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        z = rng.normal(size=(2 * n, n))
    # low-rank structure plus noise, badly scaled columns: an expert's hidden activations look so
    else:
        z = (
            rng.normal(size=(2 * n, 6)) @ rng.normal(size=(6, n))
            + 0.05 * rng.normal(size=(2 * n, n))
        ) * np.exp(rng.normal(0, 1, n))
    h = z.T @ z
    return h + 0.01 * np.mean(np.diag(h)) * np.eye(n)


@pytest.mark.parametrize(
    "n,kind,tol",
    [(1, "gauss", 1e-6), (7, "gauss", 1e-6), (96, "gauss", 1e-6), (96, "correlated", 2e-4)],
)
def test_matches_textbook_float64(n, kind, tol):
    h = _hessian(n, kind)
    ref = np.linalg.cholesky(np.linalg.inv(h)).T
    got = np.asarray(upper_inverse_cholesky(jnp.asarray(h, jnp.float32)), np.float64)
    assert np.all(np.tril(got, -1) == 0)  # upper triangular
    assert np.all(np.diag(got) > 0)  # the unique factor: positive diagonal
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < tol, rel
    np.testing.assert_allclose(got.T @ got @ h, np.eye(n), atol=50 * tol)


def test_not_positive_definite_gives_nan():
    """The feedback falls back to nearest rounding on a non-finite factor: it must not come back
    finite."""
    h = np.diag([1.0, -1.0, 2.0]).astype(np.float32)
    assert not np.isfinite(np.asarray(upper_inverse_cholesky(jnp.asarray(h)))).all()
