"""The routed-expert product on TPU (backend ``"mosaic_tpu"``): rows regrouped into row tiles, the
gate/up and down kernels of `kernels` over the bit-plane layout of `layout`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mosaic_tpu import kernels as tpu_kernels
from pallas_kernels.mosaic_tpu.layout import PlaneTiles
from pallas_kernels.routing import (
    dense16_inits,
    gather_rows,
    make_row_tiles,
    to_row_tiles,
)


def step_tables(pt: PlaneTiles) -> tuple[jax.Array, ...]:
    def flat(a):
        return jnp.asarray(a).reshape(-1)

    return (
        flat(pt.step_q),
        flat(pt.step_tile),
        flat(pt.step_local),
        flat(pt.step_plane),
        jnp.asarray(pt.expert_nsteps),
    )


def mosaic_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret):
    """TPU family: bit-plane kernels with scalar prefetch. -> (acc in kernel order [M, ·], h, rows
    of h)."""
    g_l, u_l, d_l = kern.parts()
    m, dt = zg.shape[0], zg.dtype
    rt = make_row_tiles(group_sizes, m, tm)
    to_tiles = to_row_tiles(rt, tm)
    zk_g = to_tiles(gather_rows(zg, jnp.asarray(g_l.kernel_comp)[rows_e]))
    zk_u = to_tiles(gather_rows(zu.astype(dt), jnp.asarray(u_l.kernel_comp)[rows_e]))
    init_g, init_u = (
        None if x is None else to_tiles(x)
        for x in dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes)
    )
    gu_args = (
        rt,
        step_tables(g_l),
        step_tables(u_l),
        zk_g,
        zk_u,
        g_l.words,
        u_l.words,
        g_l.scales,
        u_l.scales,
        init_g,
        init_u,
    )
    h = tpu_kernels.gate_up(
        *gu_args,
        tile=g_l.tile,
        n_block=g_l.block,
        group_size=g_l.group_size,
        n_valid=g_l.n,
        out_dtype=dt,
        tm=tm,
        interpret=interpret,
    )
    tables = step_tables(d_l)
    tables = tables[:4] + (jnp.asarray(d_l.step_fblock).reshape(-1),) + tables[4:]
    acc_k = tpu_kernels.down(
        rt,
        tables,
        jnp.asarray(d_l.tile_bits),
        d_l.max_tiles,
        h,
        d_l.words,
        d_l.scales,
        tile=d_l.tile,
        f_block=d_l.block,
        group_size=d_l.group_size,
        tm=tm,
        interpret=interpret,
    )
    return acc_k[rt.dest], h, lambda hh: hh[rt.dest]
