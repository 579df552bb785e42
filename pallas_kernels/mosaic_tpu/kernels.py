"""TPU (Mosaic) kernels: the megablox scheme — routing and layout tables as scalar prefetch, the
reduction over an expert's plane blocks as the innermost ("arbitrary") grid axis.

A grid step fetches one plane block by `BlockSpec` index maps that read the prefetched tables, so
the pipeline DMAs exactly the routed experts' words, double-buffered, while the previous block is
unpacked in vregs (`unpack.signed_plane_product`: shifts, masks and a tile-aligned reshape) and fed
to the MXU. Steps past an expert's item count and row tiles past the real count repeat the previous
block indices (the tables are padded by repetition), so nothing new is fetched for them, and compute
is skipped with `pl.when`. Each output block is owned by one row tile (see `routing`) and written
once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import tpu_compiler_params, tpu_modules
from pallas_kernels.mosaic_tpu.unpack import WORD_BITS, plane_weight, signed_plane_product
from pallas_kernels.routing import RowTiles


def _pallas_call(
    kernel, out_shape, grid_spec, dimension_semantics: tuple[str, ...], interpret, name: str
):
    """``pl.pallas_call`` with Mosaic's compiler params, except under the generic interpreter
    (``interpret=True``), which has no use for them. The TPU interpreter (`pltpu.InterpretParams`)
    keeps them: it splits the "parallel" axes over its simulated cores, as a megacore chip does, and
    reports blocks that two cores would both write."""
    generic = interpret is True
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=grid_spec,
        interpret=interpret,
        name=name,
        compiler_params=None if generic else tpu_compiler_params(dimension_semantics),
    )


def gate_up(
    row_tiles: RowTiles,
    gate_tables,
    up_tables,
    zg,
    zu,
    wg,
    wu,
    sg,
    su,
    init_g,
    init_u,
    *,
    tm: int,
    tile: int,
    n_block: int,
    group_size: int,
    n_valid: int,
    out_dtype,
    interpret,
):
    """``h = silu(zg·A_g[e]) ⊙ (zu·A_u[e])`` per row tile -> ``[Mp, Fp]`` in ``out_dtype``.

    ``*_tables``: each projection's ``(step_q, step_tile, step_local, step_plane)`` flattened
    ``[E·S]`` plus ``nsteps [E]`` (`layout.PlaneTiles`). ``zg``, ``zu``: rows gathered into kernel
    component order, in row tiles of ``tm``; ``init_*``: the 16-bit units' contributions or None.
    The grid is (output block, row tile, step); the steps of one (block, row tile) accumulate in
    VMEM scratch. ``interpret``: False, True (the generic HLO interpreter) or a
    `pltpu.InterpretParams` (the TPU interpreter: DMAs, uninitialized VMEM, several cores, see
    `_pallas_call`).
    """
    pltpu, grid_spec_cls = tpu_modules()
    mp = zg.shape[0]
    fp = wg.shape[-1]
    rows_per = tile // WORD_BITS
    groups = n_block // group_size
    e_count = gate_tables[-1].shape[0]
    sg_n, su_n = gate_tables[0].shape[0] // e_count, up_tables[0].shape[0] // e_count
    steps = max(sg_n, su_n)
    dt = zg.dtype
    has_init = init_g is not None

    def item(te, v, s, n_steps):
        return te[v] * n_steps + jnp.minimum(s, n_steps - 1)

    def z_map(n_steps, local_pos):
        def f(n, v, s, te, tc, *t):
            return v, t[local_pos][item(te, v, s, n_steps)]

        return f

    def w_map(n_steps, q_pos):
        def f(n, v, s, te, tc, *t):
            return t[q_pos][item(te, v, s, n_steps)], 0, n

        return f

    def s_map(n_steps, tile_pos):
        def f(n, v, s, te, tc, *t):
            return n, 0, t[tile_pos][item(te, v, s, n_steps)]

        return f

    def out_map(n, v, s, *_):
        return v, n

    # table positions in the prefetch list after (te, tc): gate q,tile,local,plane,n = 0..4; up =
    # 5..9
    in_specs = [
        pl.BlockSpec((tm, tile), z_map(sg_n, 2)),
        pl.BlockSpec((tm, tile), z_map(su_n, 7)),
        pl.BlockSpec((None, rows_per, n_block), w_map(sg_n, 0)),
        pl.BlockSpec((None, rows_per, n_block), w_map(su_n, 5)),
        pl.BlockSpec((groups, 1, tile), s_map(sg_n, 1)),
        pl.BlockSpec((groups, 1, tile), s_map(su_n, 6)),
    ]
    if has_init:
        in_specs += [pl.BlockSpec((tm, n_block), out_map)] * 2

    def kernel(
        te,
        tc,
        gq,
        gt,
        gl,
        gp,
        gn,
        uq,
        ut,
        ul,
        up_,
        un,
        zg_ref,
        zu_ref,
        wg_ref,
        wu_ref,
        sg_ref,
        su_ref,
        *rest,
    ):
        if has_init:
            ig_ref, iu_ref, o_ref, accg, accu = rest
        else:
            o_ref, accg, accu = rest
        n_i = pl.program_id(
            0
        )  # read program ids outside pl.when: interpret mode substitutes them only here
        v = pl.program_id(1)
        s = pl.program_id(2)
        e = te[v]
        active = v < tc[0]

        @pl.when(s == 0)
        def _():
            accg[...] = ig_ref[...] if has_init else jnp.zeros_like(accg)
            accu[...] = iu_ref[...] if has_init else jnp.zeros_like(accu)

        for p_ref, n_ref, n_steps, z_ref, w_ref, s_ref, acc in (
            (gp, gn, sg_n, zg_ref, wg_ref, sg_ref, accg),
            (up_, un, su_n, zu_ref, wu_ref, su_ref, accu),
        ):

            @pl.when(active & (s < n_ref[e]))
            def _(p_ref=p_ref, n_steps=n_steps, z_ref=z_ref, w_ref=w_ref, s_ref=s_ref, acc=acc):
                z = z_ref[...].astype(jnp.float32) * plane_weight(p_ref[item(te, v, s, n_steps)])
                for g in range(groups):
                    lanes = slice(g * group_size, (g + 1) * group_size)
                    zs = (z * s_ref[g].astype(jnp.float32)).astype(dt)
                    acc[:, lanes] += signed_plane_product(zs, w_ref[:, lanes], 0, WORD_BITS, True)

        @pl.when(active & (s == steps - 1))
        def _():
            col = n_i * n_block + jax.lax.broadcasted_iota(jnp.int32, (tm, n_block), 1)
            h = jnp.where(col < n_valid, jax.nn.silu(accg[...]) * accu[...], 0.0)
            o_ref[...] = h.astype(out_dtype)

    grid_spec = grid_spec_cls(
        num_scalar_prefetch=12,
        grid=(fp // n_block, row_tiles.expert.shape[0], steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, n_block), out_map),
        scratch_shapes=[
            pltpu.VMEM((tm, n_block), jnp.float32),
            pltpu.VMEM((tm, n_block), jnp.float32),
        ],
    )
    args = [row_tiles.expert, row_tiles.count, *gate_tables, *up_tables, zg, zu, wg, wu, sg, su]
    args += [init_g, init_u] if has_init else []
    return _pallas_call(
        kernel,
        jax.ShapeDtypeStruct((mp, fp), out_dtype),
        grid_spec,
        ("parallel", "arbitrary", "arbitrary"),
        interpret,
        "bitsmoe_gate_up_mosaic",
    )(*args)


def down(
    row_tiles: RowTiles,
    step_tables,
    tile_bits,
    lmax: int,
    h,
    w,
    s,
    *,
    tm: int,
    tile: int,
    f_block: int,
    group_size: int,
    interpret,
):
    """``acc = h·B[e]ᵀ`` per row tile in kernel component order -> ``[Mp, lmax·tile]`` float32.

    ``step_tables``: ``(step_q, step_tile, step_local, step_plane, step_fblock)`` flattened
    ``[E·S]`` plus ``nsteps [E]`` — items ordered (tile, f-block, plane), so each output block
    ``(row tile, local tile)`` is accumulated over one consecutive run of steps.
    """
    pltpu, grid_spec_cls = tpu_modules()
    mp, fp = h.shape
    rf = f_block // WORD_BITS
    groups = f_block // group_size
    t_per_group = WORD_BITS // groups
    f_blocks = fp // f_block
    e_count = step_tables[-1].shape[0]
    n_steps = step_tables[0].shape[0] // e_count

    def item(te, v, s):
        return te[v] * n_steps + jnp.minimum(s, n_steps - 1)

    # prefetch: te, tc, q, tile, local, plane, fblock, nsteps, tile_bits
    def h_map(v, s, te, tc, q, t, loc, p, fb, n, b):
        return v, fb[item(te, v, s)]

    def w_map(v, s, te, tc, q, t, loc, p, fb, n, b):
        i = item(te, v, s)
        return q[i], fb[i], 0

    def s_map(v, s, te, tc, q, t, loc, p, fb, n, b):
        i = item(te, v, s)
        return fb[i], 0, t[i]

    def o_map(v, s, te, tc, q, t, loc, p, fb, n, b):
        return v, loc[item(te, v, s)]

    def kernel(te, tc, q, t, loc, p, fb, n, b, h_ref, w_ref, s_ref, o_ref, acc):
        v = pl.program_id(0)
        s = pl.program_id(1)
        i = item(te, v, s)
        active = (v < tc[0]) & (s < n[te[v]])

        @pl.when(active & (fb[i] == 0) & (p[i] == 0))
        def _():
            acc[...] = jnp.zeros_like(acc)

        @pl.when(active)
        def _():
            words = w_ref[...]  # [Rf, tile]
            wp = plane_weight(p[i])
            total = acc[...]
            for g in range(groups):
                hg = h_ref[:, g * group_size : (g + 1) * group_size]
                part = signed_plane_product(
                    hg, words, g * t_per_group, t_per_group, True
                )  # [tm, tile]
                total = total + part * (s_ref[g].astype(jnp.float32) * wp)
            acc[...] = total

        @pl.when(active & (fb[i] == f_blocks - 1) & (p[i] == b[t[i]] - 1))
        def _():
            o_ref[...] = acc[...]

    grid_spec = grid_spec_cls(
        num_scalar_prefetch=9,
        grid=(row_tiles.expert.shape[0], n_steps),
        in_specs=[
            pl.BlockSpec((tm, f_block), h_map),
            pl.BlockSpec((None, rf, tile), w_map),
            pl.BlockSpec((groups, 1, tile), s_map),
        ],
        out_specs=pl.BlockSpec((tm, tile), o_map),
        scratch_shapes=[pltpu.VMEM((tm, tile), jnp.float32)],
    )
    return _pallas_call(
        kernel,
        jax.ShapeDtypeStruct((mp, lmax * tile), jnp.float32),
        grid_spec,
        ("parallel", "arbitrary"),
        interpret,
        "bitsmoe_down_mosaic",
    )(row_tiles.expert, row_tiles.count, *step_tables, tile_bits, h, w, s)
