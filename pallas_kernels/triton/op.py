"""The routed-expert product on GPU (backend ``"triton"``): the decode GEMVs of `kernels` over the
integer-code layout of `layout`, or (prefill) the factors dequantized by a kernel then XLA's grouped
matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from pallas_kernels.routing import (
    dense16_inits,
    gather_rows,
    make_row_tiles,
    to_row_tiles,
)
from pallas_kernels.triton import kernels as triton_kernels
from pallas_kernels.triton.layout import CodeTiles


def reduction_splits(programs: int, steps: int, target: int = 1024, min_steps: int = 4) -> int:
    """Chunks to cut a per-program reduction of ``steps`` items into (Triton), so that about
    ``target`` programs run (a few per SM on current GPUs) while each keeps ≥ ``min_steps``
    items."""
    return max(1, min(steps // min_steps, target // max(programs, 1)))


def gemv_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret, splits):
    """GPU decode: the code-layout GEMVs. -> (acc in kernel order [M, L·C], h [Mp, Fp], rows of
    h)."""
    g_l, u_l, d_l = kern.parts()
    m, dt = zg.shape[0], zg.dtype
    gs, c = g_l.group_size, g_l.tile
    gp = g_l.n_padded // gs
    rt = make_row_tiles(group_sizes, m, tm)
    to_tiles = to_row_tiles(rt, tm)
    t = rt.expert.shape[0]
    exps = triton_kernels.exponent_table()

    def flat(a):
        return jnp.asarray(a).reshape(-1)

    def quad(a):
        return jnp.asarray(a).reshape(*a.shape[:-1], a.shape[-1] // 4, 4)  # a thread's 4 columns

    z = [
        quad(to_tiles(gather_rows(zz.astype(jnp.float32), jnp.asarray(pt.kernel_comp)[rows_e])))
        for zz, pt in ((zg, g_l), (zu, u_l))
    ]
    tabs = [
        (flat(pt.expert_tiles), flat(pt.width_start), jnp.asarray(pt.tile_row0))
        for pt in (g_l, u_l)
    ]
    gu_splits = splits or reduction_splits(gp * t, max(g_l.max_tiles, u_l.max_tiles), min_steps=2)
    g, u = triton_kernels.gate_up_gemv(
        rt,
        *tabs,
        *z,
        quad(g_l.words),
        quad(u_l.words),
        quad(g_l.scales),
        quad(u_l.scales),
        exps,
        tm=tm,
        tile=c,
        group_size=gs,
        widths=(g_l.widths, u_l.widths),
        max_tiles=(g_l.max_tiles, u_l.max_tiles),
        interpret=interpret,
        splits=gu_splits,
    )
    fp = g_l.n_padded
    inits = [
        None if x is None else to_tiles(x)
        for x in dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes)
    ]
    h = _gated(g[:, :fp], u[:, :fp], inits, g_l, dt)
    hsum = h.astype(jnp.float32).reshape(h.shape[0], gp, gs).sum(axis=2)
    hp = jnp.pad(h.astype(jnp.float32), ((0, 0), (0, triton_kernels.overrun(d_l.widths, gs))))
    hp = hp.reshape(t, tm, hp.shape[1]).transpose(0, 2, 1)  # [T, Fp + overrun, tm]
    d_splits = splits or reduction_splits(d_l.max_tiles * t, gp)
    acc_k = triton_kernels.down_gemv(
        rt,
        flat(d_l.expert_tiles),
        jnp.asarray(d_l.expert_ntiles),
        jnp.asarray(d_l.tile_bits),
        jnp.asarray(d_l.tile_row0),
        hp,
        hsum,
        d_l.words,
        d_l.scales,
        exps,
        tm=tm,
        tile=d_l.tile,
        group_size=gs,
        widths=d_l.widths,
        interpret=interpret,
        splits=d_splits,
    )
    return acc_k[rt.dest], h, lambda hh: hh[rt.dest]


def dequantized_experts(zg, zu, group_sizes, kern, rows_e, interpret):
    """GPU prefill: each expert's factors dequantized by the kernels, then XLA's grouped matmul."""
    g_l, u_l, d_l = kern.parts()
    dt = zg.dtype
    exps = triton_kernels.exponent_table()

    def deq(pt, tr):
        return triton_kernels.dequantize_tiles(
            pt, exps, dtype=dt, transpose=tr, interpret=interpret
        )

    g = _grouped_f32(
        gather_rows(zg, jnp.asarray(g_l.kernel_comp)[rows_e]), deq(g_l, True), group_sizes
    )
    u = _grouped_f32(
        gather_rows(zu.astype(dt), jnp.asarray(u_l.kernel_comp)[rows_e]),
        deq(u_l, True),
        group_sizes,
    )
    h = _gated(g, u, dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes), g_l, dt)
    return _grouped_f32(h, deq(d_l, False), group_sizes), h, lambda hh: hh


def _gated(g: jax.Array, u: jax.Array, inits, pt: CodeTiles, dtype) -> jax.Array:
    """``h = silu(g)·u`` in ``dtype``, zero past ``F``, after adding the 16-bit units' contributions
    ``inits = (to g, to u)`` (or ``(None, None)``)."""
    if inits[0] is not None:
        g, u = g + inits[0], u + inits[1]
    return jnp.where(jnp.arange(pt.n_padded) < pt.n, jax.nn.silu(g) * u, 0.0).astype(dtype)


def _grouped_f32(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul accumulating in float32 (``ragged_dot`` on GPU/TPU, the tiled loop on CPU)."""
    if jax.default_backend() == "cpu":
        return grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), group_sizes)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
