"""GPU (Triton) kernels: grouped gate/up with SiLU gating, and grouped down, reading plane blocks.

On GPU a Pallas grid point is an independent program, so a reduction cannot run over grid steps the
way it does on TPU. Each program owns one output block of one row tile (which holds one expert's
rows, see `routing`) and loops over that expert's plane blocks itself (`fori_loop` with bounds read
from the layout tables — experts hold different bit mixes). Operands are whole-array references in
global memory; every load is one plane block ``[R, lanes]`` of int32 words, unpacked in registers
(`unpack.signed_plane_product`), so no bf16 weight is ever written to memory: at decode the kernel reads each
routed expert's words once per row tile. Routing and layout tables are small int32 arrays in
global memory (Triton has no scalar-prefetch memory space; reads of them are scalar loads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import triton_compiler_params
from pallas_kernels.routing import RowTiles
from pallas_kernels.unpack import WORD_BITS, plane_weight, signed_plane_product


def gate_up(
    row_tiles: RowTiles, gate_tables, up_tables, zg, zu, wg, wu, sg, su, init_g, init_u, *,
    tm: int, tile: int, n_block: int, group_size: int, n_valid: int, out_dtype, interpret: bool,
    num_warps: int = 4, num_stages: int = 2,
):
    """``h = silu(z_g·A_g[e]) ⊙ (z_u·A_u[e])`` per row tile -> ``[Mp, Fp]`` (lanes past ``n_valid`` zero).

    ``*_tables``: ``(step_q, step_tile, step_local, step_plane)`` flattened ``[E·S]`` plus
    ``nsteps [E]``. ``init_g/init_u`` (``[Mp, Fp]`` float32 or None): contributions of 16-bit units
    computed outside, added before the gating.
    """
    mp = zg.shape[0]
    fp = wg.shape[-1]
    groups = n_block // group_size
    e_count = gate_tables[-1].shape[0]
    steps = (gate_tables[0].shape[0] // e_count, up_tables[0].shape[0] // e_count)
    use_dot = tm >= 16 and tile >= 16 and group_size >= 16
    dt = zg.dtype
    has_init = init_g is not None

    def kernel(te, tc, gq, gt, gl, gp, gn, uq, ut, ul, up_, un, zg_ref, zu_ref, wg_ref, wu_ref, sg_ref, su_ref, *rest):
        init_refs, o_ref = (rest[:2], rest[2]) if has_init else ((None, None), rest[0])
        n_i = pl.program_id(0)
        v = pl.program_id(1)

        @pl.when(v < tc[0])
        def _():
            e = te[v]
            rows = pl.ds(v * tm, tm)

            def lanes(g):
                return pl.ds(n_i * n_block + g * group_size, group_size)

            def run(tables, nsteps, z_ref, w_ref, s_ref, init_ref):
                q_ref, t_ref, l_ref, p_ref, n_ref = tables
                if init_ref is not None:
                    acc0 = tuple(init_ref[rows, lanes(g)] for g in range(groups))
                else:
                    acc0 = tuple(jnp.zeros((tm, group_size), jnp.float32) for _ in range(groups))

                def body(s, accs):
                    i = e * nsteps + s
                    q, tid = q_ref[i], t_ref[i]
                    z = z_ref[rows, pl.ds(l_ref[i] * tile, tile)].astype(jnp.float32) * plane_weight(p_ref[i])
                    out = []
                    for g in range(groups):
                        sc = s_ref[n_i * groups + g, :, pl.ds(tid * tile, tile)].astype(jnp.float32)  # [1, tile]
                        w = w_ref[q, :, lanes(g)]  # [R, gs]
                        out.append(accs[g] + signed_plane_product((z * sc).astype(dt), w, 0, WORD_BITS, use_dot))
                    return tuple(out)

                return jax.lax.fori_loop(0, n_ref[e], body, acc0)

            ag = run((gq, gt, gl, gp, gn), steps[0], zg_ref, wg_ref, sg_ref, init_refs[0])
            au = run((uq, ut, ul, up_, un), steps[1], zu_ref, wu_ref, su_ref, init_refs[1])
            for g in range(groups):
                col = n_i * n_block + g * group_size + jax.lax.broadcasted_iota(jnp.int32, (tm, group_size), 1)
                h = jnp.where(col < n_valid, jax.nn.silu(ag[g]) * au[g], 0.0)
                o_ref[rows, lanes(g)] = h.astype(out_dtype)

    args = [row_tiles.expert, row_tiles.count, *gate_tables, *up_tables, zg, zu, wg, wu, sg, su]
    args += [init_g, init_u] if has_init else []
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, fp), out_dtype),
        grid=(fp // n_block, row_tiles.expert.shape[0]),
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="bitsmoe_gate_up_triton",
    )(*args)


def down(
    row_tiles: RowTiles, expert_tiles, expert_ntiles, tile_q0, tile_bits, h, w, s, *,
    tm: int, tile: int, f_block: int, group_size: int, interpret: bool, num_warps: int = 4, num_stages: int = 2,
):
    """``acc = h·B[e]ᵀ`` per row tile, in kernel component order -> ``[Mp, L·tile]`` float32."""
    mp, fp = h.shape
    lmax = expert_tiles.shape[1]
    rf = f_block // WORD_BITS
    groups = f_block // group_size
    t_per_group = WORD_BITS // groups
    use_dot = tm >= 16 and group_size >= 16 and tile >= 16

    def kernel(te, tc, et_ref, en_ref, q0_ref, b_ref, h_ref, w_ref, s_ref, o_ref):
        lc = pl.program_id(0)
        v = pl.program_id(1)
        e = te[v]

        @pl.when((v < tc[0]) & (lc < en_ref[e]))
        def _():
            rows = pl.ds(v * tm, tm)
            tid = et_ref[e * lmax + lc]
            q0 = q0_ref[tid]

            def f_body(ft, acc):
                hs = [h_ref[rows, pl.ds(ft * f_block + g * group_size, group_size)] for g in range(groups)]
                scs = [s_ref[ft * groups + g, :, pl.ds(tid * tile, tile)].astype(jnp.float32) for g in range(groups)]

                def p_body(p, acc):
                    words = w_ref[q0 + p, pl.ds(ft * rf, rf), :]  # [Rf, tile]
                    wp = plane_weight(p)
                    for g in range(groups):
                        part = signed_plane_product(hs[g], words, g * t_per_group, t_per_group, use_dot)  # [tm, tile]
                        acc = acc + part * (scs[g] * wp)
                    return acc

                return jax.lax.fori_loop(0, b_ref[tid], p_body, acc)

            acc = jax.lax.fori_loop(0, fp // f_block, f_body, jnp.zeros((tm, tile), jnp.float32))
            o_ref[rows, pl.ds(lc * tile, tile)] = acc

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, lmax * tile), jnp.float32),
        grid=(lmax, row_tiles.expert.shape[0]),
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="bitsmoe_down_triton",
    )(row_tiles.expert, row_tiles.count, expert_tiles.reshape(-1), expert_ntiles, tile_q0, tile_bits, h, w, s)
