"""The CPU grouped matmul (tiled visits) against a float64 per-group loop and against
`ragged_dot`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.models.grouped_matmul import tiled_grouped_matmul


def _reference(x: np.ndarray, w: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, s in enumerate(sizes):
        out[start : start + s] = x[start : start + s].astype(np.float64) @ w[g].astype(np.float64)
        start += s
    return out


@pytest.mark.parametrize(
    "sizes,tile", [([5, 0, 17, 1, 0, 9], 4), ([64, 64], 128), ([0, 0, 3], 2), ([7, 3, 0, 20], 8)]
)
def test_tiled_matches_per_group_loop_and_ragged_dot_gradient(sizes, tile):
    rng = np.random.default_rng(len(sizes) + tile)
    sizes = np.asarray(sizes, np.int32)
    m = int(sizes.sum()) + 3  # rows past the groups' total are zero in the output
    x = rng.standard_normal((m, 12)).astype(np.float32)
    w = rng.standard_normal((len(sizes), 12, 10)).astype(np.float32)
    got = np.asarray(
        jax.jit(tiled_grouped_matmul, static_argnames="tile")(
            jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), tile=tile
        )
    )
    np.testing.assert_allclose(got, _reference(x, w, sizes), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, jnp.asarray(sizes))))

    ours = jax.grad(loss(lambda x, w, s: tiled_grouped_matmul(x, w, s, tile)), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(w)
    )
    native = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    for a, b in zip(ours, native, strict=False):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
