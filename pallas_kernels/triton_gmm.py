"""GPU (Triton) kernels: grouped gate/up with SiLU gating, and grouped down, reading plane blocks.

On GPU a Pallas grid point is an independent program, so a reduction cannot run over grid steps the
way it does on TPU. Each program owns one output block of one row tile (which holds one expert's
rows, see `routing`) and loops over that expert's plane blocks itself (`fori_loop` with bounds read
from the layout tables — experts hold different bit mixes). Operands are whole-array references in
global memory; every load is one plane block ``[R, lanes]`` of int32 words, unpacked in registers
(`unpack.signed_plane_product`), so no bf16 weight is ever written to memory: each routed expert's
words are read once per row tile. Routing and layout tables are small int32 arrays in global memory
(Triton has no scalar-prefetch memory space; reads of them are scalar loads).

Split reduction (``splits > 1``): at decode there are only (output blocks × routed experts)
programs — a few hundred on Mixtral, too few warps to keep HBM busy. The reduction (plane blocks for
gate/up, f-blocks for down) is then cut into ``splits`` chunks on a third grid axis, each program
adds its partial sums into a zero-initialised float32 output with masked atomic adds (real rows
only), and the SiLU gating runs after gate/up in XLA (``[M, F]`` elementwise, negligible at decode).
With ``splits == 1`` gate/up is one fused kernel writing ``h`` directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import triton_compiler_params
from pallas_kernels.routing import RowTiles
from pallas_kernels.unpack import WORD_BITS, plane_weight, signed_plane_product


def _atomic_add(o_ref, rows, cols, value, mask, interpret: bool) -> None:
    """Atomic ``o[rows, cols] += value`` on the real rows only. Interpret mode cannot discharge a masked
    atomic, so there the masked-out entries add 0 instead (same result)."""
    from jax.experimental.pallas import triton as plt

    if interpret:
        plt.atomic_add(o_ref, (rows, cols), jnp.where(mask, value, 0.0))
    else:
        plt.atomic_add(o_ref, (rows, cols), value, mask=mask)


def _call(kernel, out_shape, grid, args, interpret, num_warps, num_stages, name, aliases=None):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases or {},
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def gate_up(
    row_tiles: RowTiles, gate_tables, up_tables, zg, zu, wg, wu, sg, su, init_g, init_u, *,
    tm: int, tile: int, n_block: int, group_size: int, n_valid: int, out_dtype, interpret: bool,
    splits: int = 1, num_warps: int = 4, num_stages: int = 2,
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
    chunks = tuple(-(-s // splits) for s in steps)
    use_dot = tm >= 16 and tile >= 16 and group_size >= 16
    dt = zg.dtype
    has_init = init_g is not None
    split = splits > 1

    def kernel(te, tc, tr, gq, gt, gl, gp, gn, uq, ut, ul, up_, un, zg_ref, zu_ref, wg_ref, wu_ref, sg_ref, su_ref, *rest):
        if split:
            g_out, u_out = rest[-2:]
            init_refs = (None, None)
        else:
            init_refs, o_ref = (rest[:2], rest[2]) if has_init else ((None, None), rest[0])
        n_i = pl.program_id(0)
        v = pl.program_id(1)
        k_i = pl.program_id(2) if split else 0

        @pl.when(v < tc[0])
        def _():
            e = te[v]
            rows = pl.ds(v * tm, tm)
            row_ok = jax.lax.broadcasted_iota(jnp.int32, (tm, group_size), 0) < tr[v]

            def lanes(g):
                return pl.ds(n_i * n_block + g * group_size, group_size)

            def run(tables, nsteps, chunk, z_ref, w_ref, s_ref, init_ref):
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

                lo = k_i * chunk
                hi = jnp.minimum(lo + chunk, n_ref[e]) if split else n_ref[e]
                return jax.lax.fori_loop(lo, jnp.maximum(lo, hi), body, acc0)

            ag = run((gq, gt, gl, gp, gn), steps[0], chunks[0], zg_ref, wg_ref, sg_ref, init_refs[0])
            au = run((uq, ut, ul, up_, un), steps[1], chunks[1], zu_ref, wu_ref, su_ref, init_refs[1])
            for g in range(groups):
                if split:
                    _atomic_add(g_out, rows, lanes(g), ag[g], row_ok, interpret)
                    _atomic_add(u_out, rows, lanes(g), au[g], row_ok, interpret)
                else:
                    col = n_i * n_block + g * group_size + jax.lax.broadcasted_iota(jnp.int32, (tm, group_size), 1)
                    h = jnp.where(col < n_valid, jax.nn.silu(ag[g]) * au[g], 0.0)
                    o_ref[rows, lanes(g)] = h.astype(out_dtype)

    args = [row_tiles.expert, row_tiles.count, row_tiles.rows, *gate_tables, *up_tables, zg, zu, wg, wu, sg, su]
    grid = (fp // n_block, row_tiles.expert.shape[0])
    if not split:
        args += [init_g, init_u] if has_init else []
        return _call(kernel, jax.ShapeDtypeStruct((mp, fp), out_dtype), grid, args, interpret, num_warps, num_stages,
                     "bitsmoe_gate_up_triton")
    zeros = jnp.zeros((mp, fp), jnp.float32)
    args += [zeros if init_g is None else init_g, zeros if init_u is None else init_u]
    acc = jax.ShapeDtypeStruct((mp, fp), jnp.float32)
    g, u = _call(kernel, (acc, acc), grid + (splits,), args, interpret, num_warps, num_stages,
                 "bitsmoe_gate_up_split_triton", aliases={len(args) - 2: 0, len(args) - 1: 1})
    h = jax.nn.silu(g) * u
    return jnp.where(jnp.arange(fp) < n_valid, h, 0.0).astype(out_dtype)


def down(
    row_tiles: RowTiles, expert_tiles, expert_ntiles, tile_q0, tile_bits, h, w, s, *,
    tm: int, tile: int, f_block: int, group_size: int, interpret: bool, splits: int = 1,
    num_warps: int = 4, num_stages: int = 2,
):
    """``acc = h·B[e]ᵀ`` per row tile, in kernel component order -> ``[Mp, L·tile]`` float32."""
    mp, fp = h.shape
    lmax = expert_tiles.shape[1]
    rf = f_block // WORD_BITS
    groups = f_block // group_size
    t_per_group = WORD_BITS // groups
    f_blocks = fp // f_block
    chunk = -(-f_blocks // splits)
    use_dot = tm >= 16 and group_size >= 16 and tile >= 16
    split = splits > 1

    def kernel(te, tc, tr, et_ref, en_ref, q0_ref, b_ref, h_ref, w_ref, s_ref, *rest):
        o_ref = rest[-1]
        lc = pl.program_id(0)
        v = pl.program_id(1)
        k_i = pl.program_id(2) if split else 0
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

            lo = k_i * chunk
            hi = jnp.minimum(lo + chunk, f_blocks) if split else f_blocks
            acc = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), f_body, jnp.zeros((tm, tile), jnp.float32))
            if split:
                row_ok = jax.lax.broadcasted_iota(jnp.int32, (tm, tile), 0) < tr[v]
                _atomic_add(o_ref, rows, pl.ds(lc * tile, tile), acc, row_ok, interpret)
            else:
                o_ref[rows, pl.ds(lc * tile, tile)] = acc

    args = [row_tiles.expert, row_tiles.count, row_tiles.rows, expert_tiles.reshape(-1), expert_ntiles, tile_q0,
            tile_bits, h, w, s]
    out = jax.ShapeDtypeStruct((mp, lmax * tile), jnp.float32)
    if not split:
        return _call(kernel, out, (lmax, row_tiles.expert.shape[0]), args, interpret, num_warps, num_stages,
                     "bitsmoe_down_triton")
    args.append(jnp.zeros((mp, lmax * tile), jnp.float32))
    return _call(kernel, out, (lmax, row_tiles.expert.shape[0], splits), args, interpret, num_warps, num_stages,
                 "bitsmoe_down_split_triton", aliases={len(args) - 1: 0})
