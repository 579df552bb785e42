"""Routing metadata of the grouped kernels: rows regrouped into row tiles that each hold one expert.

Rows arrive sorted by expert (``RoutingPlan``). Each expert's rows are placed at the start of its
own run of row tiles of ``tm`` rows (the rest of its last tile is zero padding), so every row tile
belongs to exactly one expert and every output block is written by exactly one grid visit — no
masked read-modify-write at group boundaries, and a TPU output block is revisited only on
consecutive grid steps. The number of row tiles must be static: ``Σ_e ceil(g_e/tm) ≤ ceil(M/tm) +
min(E, M) − 1`` (each of the at most ``min(E, M)`` non-empty experts adds at most one partial tile).
Tiles past the real count repeat the last real expert — same block indices, so a TPU pipeline
fetches nothing new for them — and the kernels skip them. Empty experts get no tile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from bitsmoe_jax.models.grouped_matmul import grouped_matmul


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowTiles:
    """``expert [T]`` per row tile, ``count [1]`` real tiles, ``rows [T]`` real rows in each tile
    (the
    rest is padding), ``dest [M]`` padded row of each sorted row."""

    expert: jax.Array
    count: jax.Array
    rows: jax.Array
    dest: jax.Array


def num_row_tiles(m: int, tm: int, num_experts: int) -> int:
    """Static bound on the row tiles (see the module docstring)."""
    return -(-m // tm) + min(num_experts, m) - 1


def make_row_tiles(group_sizes: jax.Array, m: int, tm: int) -> RowTiles:
    """Row tiles for ``m`` rows sorted by expert (``group_sizes [E]`` traced; ``m``, ``tm``
    static)."""
    gs = group_sizes.astype(jnp.int32)
    e = gs.shape[0]
    tiles = (gs + tm - 1) // tm
    cum = jnp.cumsum(tiles)
    t = num_row_tiles(m, tm, e)
    i = jnp.arange(t, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(cum, i, side="right"), e - 1).astype(jnp.int32)
    n = cum[-1]
    expert = jnp.where(i < n, expert, expert[jnp.maximum(n - 1, 0)])
    first = cum - tiles  # first row tile of each expert
    rows = jnp.where(i < n, jnp.clip(gs[expert] - (i - first[expert]) * tm, 0, tm), 0)
    rows_e = expert_of_rows(gs, m)
    starts = jnp.cumsum(gs) - gs
    dest = first[rows_e] * tm + jnp.arange(m, dtype=jnp.int32) - starts[rows_e]
    return RowTiles(
        expert, n.reshape(1).astype(jnp.int32), rows.astype(jnp.int32), dest.astype(jnp.int32)
    )


def expert_of_rows(group_sizes: jax.Array, m: int) -> jax.Array:
    """Expert id of each of the ``m`` sorted rows (rows past ``sum(group_sizes)`` get the last
    expert)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.minimum(
        jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right"),
        group_sizes.shape[0] - 1,
    )


# ------------------------------------------------------------ rows shared by the kernel backends
def gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``out[m, j] = x[m, index[m, j]]`` with ``index == x.shape[1]`` reading zero."""
    xp = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    return jnp.take_along_axis(xp, index, axis=1)


def to_row_tiles(rt, tm: int):
    mp = rt.expert.shape[0] * tm

    def to_tiles(x: jax.Array) -> jax.Array:  # sorted rows -> padded row-tile order
        return jnp.zeros((mp, x.shape[1]), x.dtype).at[rt.dest].set(x)

    return to_tiles


def dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes):
    """Contributions of the 16-bit units of gate and up (``[M, Fp]`` float32 each), or ``(None,
    None)``."""
    if not (g_l.has_dense16 or u_l.has_dense16):
        return None, None
    return tuple(dense16_rows(z, pt, rows_e, group_sizes) for z, pt in ((zg, g_l), (zu, u_l)))


def dense16_rows(z: jax.Array, pt: Any, rows_e: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Contribution of a projection's 16-bit components, ``[M, Fp]`` float32 (zeros if it has
    none); ``pt`` is its kernel layout (`PlaneTiles` or `CodeTiles`)."""
    if not pt.has_dense16:
        return jnp.zeros((z.shape[0], pt.n_padded), jnp.float32)
    z16 = gather_rows(z.astype(jnp.float32), jnp.asarray(pt.comp16)[rows_e])
    return grouped_matmul(z16, jnp.asarray(pt.dense16).astype(jnp.float32), group_sizes).astype(
        jnp.float32
    )
