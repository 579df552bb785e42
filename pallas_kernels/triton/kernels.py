"""GPU (Triton) kernels over the code layout (`triton.layout`): decode GEMVs and a dequantizer.

**Decode (a few rows per expert).** One program per (output block, row tile, reduction chunk). The
row tile holds one expert's rows: ``tm ≤ GEMV_MAX_ROWS`` of them, the rest zero padding. The
program loops over its part of that expert's tiles, one `fori_loop` per code width present. The
width is static inside each loop, so the chunk loop is unrolled with constant shifts and masks. A
chunk costs one LOP3 and one FADD per code to decode (`decode_chunk`), and about one FFMA per code
and row to accumulate. Weights are read once per row tile as int32 words; no float weight ever
reaches memory. A program reads a ``[W_b, C]`` block of one scale group per tile; each thread holds
a few rows × 4 columns of it.

* `gate_up_gemv` (program = one scale group of output positions): the multiplier is per column,
  ``a_c = z_c·2s_{c,g}``. It costs a thread 4 products per block for about 128 codes. Each code is
  one FFMA into its chunk's accumulator, column by column (a thread's 16-byte vector is cut into its
  4 words after the load); the 4 columns are summed once, after the tile loop. The chunk ``k`` of
  row ``w`` is output position ``k·W_b + w``. The offset term ``−(2^b − 1)/2·Σ_c a_c`` is the same
  for every position and is added once. A width with no tiles in the program's chunk skips its
  atomic adds (layouts padded to a shared shape, `shared_shapes`, carry the union of their layers'
  widths).
* `down_gemv` (program = one tile of ``C`` output components): the tile's width picks one of the
  per-width branches. The multiplier ``h_f`` is per (chunk, row). Per scale group, ``Σ_f h_f·u_f``
  is accumulated and then scaled by the components' scales. The offset term uses the per-group sums
  of ``h`` (``hsum``, computed outside, ``[Mp, Gp]``).

Both write float32 with atomic adds into zeros: at decode there are too few (block × expert)
programs to keep HBM busy, so each expert's tiles (gate/up) or groups (down) are cut into ``splits``
chunks on a third grid axis. Row tiles are disjoint, and padding rows are never read back, so no
mask is needed. The SiLU gating runs in XLA between the two (``[M, F]`` elementwise).

**Prefill (many rows per expert).** The matmul is compute-bound there, so `dequantize_tiles` writes
each expert's factors in bf16 (or f32), in kernel order, for XLA's grouped matmul (``ragged_dot``).
This costs one 16-bit write and read per weight, instead of the GEMV's per-row FFMA.

The exponent words are read from a small input table (`exponent_table`) once per program, so they
are registers and ptxas fuses the mask-and-or into one LOP3 (given two immediates it emits two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.compat import triton_compiler_params
from pallas_kernels.triton.layout import (
    MAX_CODE_BITS,
    codes_per_half,
    codes_per_word,
    pow2_blocks,
    words_per_group,
)

GEMV_MAX_ROWS = 4  # rows per row tile: accumulators grow with it (32 registers per row)


def exponent_table() -> jax.Array:
    """``[16]`` int32: float32 bits of ``2^(23−s)`` for bit positions ``s = 0..15`` (a kernel input,
    so
    that the values are registers, not immediates: see the module docstring)."""
    return jnp.asarray([(127 + 23 - s) << 23 for s in range(16)], jnp.int32)


def load_exponents(ex_ref, bits: int) -> list[jax.Array]:
    """The exponent words of the chunks of one width (loaded once, outside the loops)."""
    return [ex_ref[bits * j] for j in range(codes_per_half(bits))]


def decode_chunk(base: jax.Array, bits: int, j: int, exponent: jax.Array) -> jax.Array:
    """Code ``j`` of each 16-bit half in ``base`` (int32, half already shifted down) -> ``u``
    float32, exact.

    ``exponent``: the float32 bits of ``2^(23−b·j)`` (`exponent_table`)."""
    s = bits * j
    f = jax.lax.bitcast_convert_type((base & (((1 << bits) - 1) << s)) | exponent, jnp.float32)
    return f - jnp.float32(2.0 ** (23 - s))


def _halves(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(low half, high half)`` of int32 words, each as the low 16 bits (one logical shift per
    word)."""
    return words, jax.lax.shift_right_logical(words, jnp.int32(16))


def block_chunks(bits: int, group_size: int, off: int, ws: int) -> list[tuple[int, int, int, int]]:
    """The chunks of a ``ws``-row block at word row ``off`` of a group that hold a live slot, as
    ``(k,
    half, j, valid)``: chunk ``k`` is code ``j`` of half ``half``; its first ``valid`` rows are
    group positions ``k·W_b + off + row < group_size``, the rest are dead slots (code 0)."""
    wb = words_per_group(bits, group_size)
    out = []
    for k in range(codes_per_word(bits)):
        valid = min(ws, group_size - k * wb - off)
        if valid > 0:
            out.append((k, *divmod(k, codes_per_half(bits)), valid))
    return out


def overrun(widths, group_size: int) -> int:
    """Columns past the last group that a block of dead slots reaches (reads of ``h``, adds of
    gate/up)."""
    return max(
        [codes_per_word(b) * words_per_group(b, group_size) - group_size for b in widths] or [0]
    )


def _columns(x: jax.Array, n: int = 4) -> list[jax.Array]:
    """The ``n`` columns of ``[..., n]`` (a thread's 4 words, a tile's rows), each ``[..., 1]``:
    register moves, no memory."""
    return jnp.split(x, n, axis=-1) if n > 1 else [x]


def _offset(bits: int) -> float:
    return (2**bits - 1) / 2


def _scaled(u: jax.Array, sc: jax.Array, bits: int) -> jax.Array:
    """``sc·(u − (2^b − 1)/2)`` as ``u·sc + (−o·sc)``. Subtracting the offset from ``u`` directly
    lets
    a compiler merge it with the exponent constant of `decode_chunk` (``2^23 + 1.5`` is not a
    float32; XLA:CPU does this merge), and the result would be off by half a step."""
    return u * sc - _offset(bits) * sc


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


def _atomic_add(o_ref, idx, value) -> None:
    from jax.experimental.pallas import triton as plt

    plt.atomic_add(o_ref, idx, value)


def _chunk_range(k_i, splits: int, total, chunk: int):
    """``[lo, hi)`` of reduction chunk ``k_i`` (all of it when ``splits == 1``)."""
    if splits == 1:
        return 0, total
    lo = k_i * chunk
    return lo, jnp.minimum(lo + chunk, total)


# ------------------------------------------------------------------------------------------ decode
# GEMVs
def gate_up_gemv(
    row_tiles,
    gate_tabs,
    up_tabs,
    zg,
    zu,
    wg,
    wu,
    sg,
    su,
    exponents,
    *,
    tm: int,
    tile: int,
    group_size: int,
    widths: tuple[tuple[int, ...], tuple[int, ...]],
    max_tiles: tuple[int, int],
    interpret: bool,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """``(zg·A_g[e], zu·A_u[e])`` per row tile -> two ``[Mp, Fp]`` float32 (atomic adds into zeros).

    ``*_tabs``: ``(expert_tiles [E·L], width_start [E·9], tile_row0 [T])``. ``zg``, ``zu``: ``[Mp,
    L·C/4, 4]`` float32 in kernel component order (row tiles of ``tm`` rows); words ``[N, C/4, 4]``,
    scales ``[Gp, T·C/4, 4]`` (free reshapes of the layout's arrays: a thread's four columns are one
    vector). One program per (scale group, row tile, tile chunk); it loops over its tiles of the
    expert, one loop per width. Its outputs are the group's positions in chunk order: each chunk's
    ``W_b`` positions are added with one atomic add per row. A block's dead slots decode to exact
    zeros, so they may spill into the next group: the outputs have `overrun` spare columns.
    """
    mp = zg.shape[0]
    gs, c4 = group_size, tile // 4
    gp = sg.shape[0]
    fp = gp * gs + overrun(widths[0] + widths[1], gs)
    nw = MAX_CODE_BITS + 1
    chunks = tuple(-(-t // splits) for t in max_tiles)

    def kernel(
        te,
        tc,
        get,
        gws,
        gtr,
        uet,
        uws,
        utr,
        ex_ref,
        zg_ref,
        zu_ref,
        wg_ref,
        wu_ref,
        sg_ref,
        su_ref,
        *rest,
    ):
        g_out, u_out = rest[-2:]
        g, v = pl.program_id(0), pl.program_id(1)
        k_i = pl.program_id(2) if splits > 1 else 0

        @pl.when(v < tc[0])
        def _():
            e = te[v]
            for et, ws_ref, tr0, z_ref, w_ref, s_ref, o_ref, widths_p, lmax, chunk in (
                (get, gws, gtr, zg_ref, wg_ref, sg_ref, g_out, widths[0], max_tiles[0], chunks[0]),
                (uet, uws, utr, zu_ref, wu_ref, su_ref, u_out, widths[1], max_tiles[1], chunks[1]),
            ):
                lo, hi = _chunk_range(k_i, splits, ws_ref[e * nw + MAX_CODE_BITS], chunk)
                corr = [jnp.zeros((1, c4, 4), jnp.float32) for _ in range(tm)]
                for b in widths_p:
                    corr = _gate_up_width(
                        b,
                        e,
                        g,
                        v,
                        lo,
                        hi,
                        et,
                        ws_ref,
                        tr0,
                        ex_ref,
                        z_ref,
                        w_ref,
                        s_ref,
                        o_ref,
                        corr,
                        tm=tm,
                        lmax=lmax,
                        gs=gs,
                        c4=c4,
                        threads=32 * num_warps,
                    )
                lanes = pl.ds(g * gs, gs)
                for t in range(tm):  # the offset term, the same for every position of the group
                    _atomic_add(
                        o_ref, (v * tm + t, lanes), jnp.broadcast_to(-jnp.sum(corr[t]), (gs,))
                    )

    args = [
        row_tiles.expert,
        row_tiles.count,
        *gate_tabs,
        *up_tabs,
        exponents,
        zg,
        zu,
        wg,
        wu,
        sg,
        su,
    ]
    args += [jnp.zeros((mp, fp), jnp.float32), jnp.zeros((mp, fp), jnp.float32)]
    acc = jax.ShapeDtypeStruct((mp, fp), jnp.float32)
    grid = (gp, row_tiles.expert.shape[0]) + ((splits,) if splits > 1 else ())
    return _call(
        kernel,
        (acc, acc),
        grid,
        args,
        interpret,
        num_warps,
        num_stages,
        "bitsmoe_gate_up_codes",
        aliases={len(args) - 2: 0, len(args) - 1: 1},
    )


def _gate_up_width(
    b,
    e,
    g,
    v,
    lo,
    hi,
    et,
    ws_ref,
    tr0,
    ex_ref,
    z_ref,
    w_ref,
    s_ref,
    o_ref,
    corr,
    *,
    tm,
    lmax,
    gs,
    c4,
    threads,
):
    """One width's tiles of gate or up in one program: accumulate, then add each chunk's positions.

    Returns ``corr`` plus this width's offset term ``(2^b − 1)/2·Σ a`` (per row, still per
    column)."""
    nw = MAX_CODE_BITS + 1
    wb = words_per_group(b, gs)
    blocks = pow2_blocks(wb)
    live = [block_chunks(b, gs, off, ws) for off, ws in blocks]
    exps = load_exponents(ex_ref, b)
    # by column: each code is one FFMA into its chunk's accumulator. Summing a thread's 4 columns
    # first costs an FMUL and an FADD more per 4 codes, but a block too small for the program's
    # threads (one word row) would be replicated 4 times over them once cut into columns.
    by_column = [ws * c4 >= threads for _, ws in blocks]
    t_lo = jnp.maximum(lo, ws_ref[e * nw + b - 1])
    t_hi = jnp.minimum(hi, ws_ref[e * nw + b])

    def body(lt, carry):
        accs, asum = (
            carry  # accs[t][bi][ki]: [ws, C/4, 1] (by column) or [ws, C/4]; asum[t]: [1, C/4, 4]
        )
        tid = et[e * lmax + lt]
        row0 = tr0[tid]
        cols = pl.ds(tid * c4, c4)
        # [1, C/4, 4]: loaded in the words' 3-D shape so that broadcasting over rows needs no
        # relayout
        sc = s_ref[pl.ds(g, 1), cols, :].astype(jnp.float32)
        a = [z_ref[pl.ds(v * tm + t, 1), pl.ds(lt * c4, c4), :] * sc for t in range(tm)]
        a_cols = [_columns(a[t]) for t in range(tm)] if any(by_column) else None  # 4 × [1, C/4, 1]
        new = [[list(x) for x in accs[t]] for t in range(tm)]
        for bi, (off, ws) in enumerate(blocks):
            words = w_ref[
                pl.ds(row0 + g * wb + off, ws), :, :
            ]  # [ws, C/4, 4]: one 16-byte load per thread and row
            parts = enumerate(_columns(words)) if by_column[bi] else [(None, words)]
            for col, part in parts:
                halves = _halves(part)
                for ki, (_, hh, j, _) in enumerate(live[bi]):
                    u = decode_chunk(halves[hh], b, j, exps[j])
                    for t in range(tm):
                        term = u * a_cols[t][col] if by_column[bi] else jnp.sum(u * a[t], axis=2)
                        new[t][bi][ki] = new[t][bi][ki] + term
        return tuple(tuple(tuple(x) for x in new[t]) for t in range(tm)), tuple(
            asum[t] + a[t] for t in range(tm)
        )

    acc0 = tuple(
        tuple(
            tuple(
                jnp.zeros((ws, c4, 1) if by_column[bi] else (ws, c4), jnp.float32) for _ in live[bi]
            )
            for bi, (_, ws) in enumerate(blocks)
        )
        for _ in range(tm)
    )
    asum0 = tuple(jnp.zeros((1, c4, 4), jnp.float32) for _ in range(tm))
    accs, asum = jax.lax.fori_loop(t_lo, jnp.maximum(t_lo, t_hi), body, (acc0, asum0))

    @pl.when(t_hi > t_lo)  # a width without tiles in this chunk adds nothing: skip its atomics
    def _():
        for t in range(tm):
            for bi, (off, ws) in enumerate(blocks):
                for ki, (k, _, _, _) in enumerate(live[bi]):
                    pos = k * wb + off
                    y = jnp.sum(
                        accs[t][bi][ki].reshape(ws, c4), axis=1
                    )  # [ws]: positions pos .. pos+ws−1 of the group
                    idx = (v * tm + t, pl.ds(g * gs + pos, ws))
                    _atomic_add(
                        o_ref, idx, y
                    )  # dead slots (past the group) add exact zeros to the next columns

    return [corr[t] + _offset(b) * asum[t] for t in range(tm)]


def down_gemv(
    row_tiles,
    expert_tiles,
    expert_ntiles,
    tile_bits,
    tile_row0,
    h,
    hsum,
    w,
    s,
    exponents,
    *,
    tm: int,
    tile: int,
    group_size: int,
    widths: tuple[int, ...],
    interpret: bool,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """``acc = h·B[e]ᵀ`` per row tile -> ``[Mp, L·C]`` float32 in kernel component order.

    ``h [T, Fp + overrun, tm]`` float32: per row tile, each position's ``tm`` rows side by side, so
    that a chunk of a block reads them with one vector load per position (at 2 rows this took the
    8-token decode from 17.5 to 16.3 SASS instructions per byte, `bench/triton_sass.py`). Zero past
    ``F``; f32 saves the per-value bf16 conversion. ``hsum [Mp, Gp]`` float32: ``h`` summed per
    scale group (rows in row-tile order, ``Mp = T·tm``).
    """
    mp = h.shape[0] * tm
    gs, c = group_size, tile
    gp = hsum.shape[1]
    lmax = expert_tiles.shape[0] // expert_ntiles.shape[0]
    split = splits > 1
    chunk = -(-gp // splits)

    def kernel(te, tc, et_ref, en_ref, tb_ref, tr0_ref, ex_ref, h_ref, hs_ref, w_ref, s_ref, *rest):
        o_ref = rest[-1]
        lc, v = pl.program_id(0), pl.program_id(1)
        k_i = pl.program_id(2) if split else 0
        e = te[v]

        @pl.when((v < tc[0]) & (lc < en_ref[e]))
        def _():
            tid = et_ref[e * lmax + lc]
            tbits = tb_ref[tid]
            row0 = tr0_ref[tid]
            lanes = pl.ds(tid * c, c)
            out_lanes = pl.ds(lc * c, c)
            lo, hi = _chunk_range(k_i, splits, gp, chunk)
            for b in widths:

                @pl.when(tbits == b)
                def _(b=b):
                    wb = words_per_group(b, gs)
                    blocks = pow2_blocks(wb)
                    exps = load_exponents(ex_ref, b)

                    def g_body(g, carry):
                        tot, corr = carry  # tm × [blocks × [ws, C]], tm × [C]
                        tot = [list(x) for x in tot]
                        f0 = g * gs
                        sc = s_ref[g, lanes].astype(jnp.float32)  # [C]
                        for bi, (off, ws) in enumerate(blocks):
                            halves = _halves(w_ref[pl.ds(row0 + g * wb + off, ws), pl.ds(0, c)])
                            part = [None] * tm
                            for k, hh, j, _ in block_chunks(b, gs, off, ws):
                                u = decode_chunk(halves[hh], b, j, exps[j])  # [ws, C]
                                # [ws, tm]: a position's rows side by side, one vector load each
                                hv = h_ref[v, pl.ds(f0 + k * wb + off, ws), :]
                                for t, hv_t in enumerate(_columns(hv, tm)):
                                    p = u * hv_t
                                    part[t] = p if part[t] is None else part[t] + p
                            for t in range(tm):
                                tot[t][bi] = tot[t][bi] + part[t] * sc[None, :]
                        corr = tuple(corr[t] + hs_ref[v * tm + t, g] * sc for t in range(tm))
                        return tuple(tuple(x) for x in tot), corr

                    tot0 = tuple(
                        tuple(jnp.zeros((ws, c), jnp.float32) for _, ws in blocks)
                        for _ in range(tm)
                    )
                    corr0 = tuple(jnp.zeros((c,), jnp.float32) for _ in range(tm))
                    tot, corr = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), g_body, (tot0, corr0))
                    for t in range(tm):
                        y = sum(jnp.sum(x, axis=0) for x in tot[t]) - _offset(b) * corr[t]
                        if split:
                            _atomic_add(o_ref, (v * tm + t, out_lanes), y)
                        else:
                            o_ref[v * tm + t, out_lanes] = y

    args = [
        row_tiles.expert,
        row_tiles.count,
        expert_tiles,
        expert_ntiles,
        tile_bits,
        tile_row0,
        exponents,
        h,
        hsum,
        w,
        s,
    ]
    out = jax.ShapeDtypeStruct((mp, lmax * c), jnp.float32)
    grid = (lmax, row_tiles.expert.shape[0])
    if not split:
        return _call(
            kernel, out, grid, args, interpret, num_warps, num_stages, "bitsmoe_down_codes"
        )
    args.append(jnp.zeros((mp, lmax * c), jnp.float32))
    return _call(
        kernel,
        out,
        grid + (splits,),
        args,
        interpret,
        num_warps,
        num_stages,
        "bitsmoe_down_codes_split",
        aliases={len(args) - 1: 0},
    )


# ------------------------------------------------------------------------------------------ prefill
# dequantizers
def dequantize_tiles(
    layout,
    exponents,
    *,
    dtype,
    transpose: bool,
    interpret: bool,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Every expert's factor in ``dtype``, kernel component order: ``[E, L·C, Fp]`` (gate/up, the
    ``z·A`` operand) with ``transpose``, else ``[E, Fp, L·C]`` (down, the ``h·Bᵀ`` operand)."""
    from jax.experimental.pallas import triton as plt

    e_count, lmax = layout.expert_tiles.shape
    fp, gs, c = layout.n_padded, layout.group_size, layout.tile

    def kernel(et_ref, en_ref, tb_ref, tr0_ref, ex_ref, w_ref, s_ref, _, o_ref):
        e, lc, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(lc < en_ref[e])
        def _():
            tid = et_ref[e * lmax + lc]
            sc = s_ref[g, pl.ds(tid * c, c)].astype(jnp.float32)
            for b in layout.widths:

                @pl.when(tb_ref[tid] == b)
                def _(b=b):
                    wb = words_per_group(b, gs)
                    exps = load_exponents(ex_ref, b)
                    for off, ws in pow2_blocks(wb):
                        halves = _halves(w_ref[pl.ds(tr0_ref[tid] + g * wb + off, ws), pl.ds(0, c)])
                        for k, hh, j, valid in block_chunks(b, gs, off, ws):
                            val = _scaled(
                                decode_chunk(halves[hh], b, j, exps[j]), sc[None, :], b
                            ).astype(dtype)
                            f_sl, c_sl = pl.ds(g * gs + k * wb + off, ws), pl.ds(lc * c, c)
                            dst = o_ref.at[e, c_sl, f_sl] if transpose else o_ref.at[e, f_sl, c_sl]
                            val = val.T if transpose else val
                            if valid == ws:
                                dst[...] = val
                            else:  # the block's tail lies past the group: dead slots, not stored
                                axis = 1 if transpose else 0
                                pos = jax.lax.broadcasted_iota(jnp.int32, val.shape, axis)
                                plt.store(dst, val, mask=pos < valid)

    shape = (e_count, lmax * c, fp) if transpose else (e_count, fp, lmax * c)
    args = [
        jnp.asarray(layout.expert_tiles).reshape(-1),
        layout.expert_ntiles,
        layout.tile_bits,
        layout.tile_row0,
        exponents,
        layout.words,
        layout.scales,
        jnp.zeros(shape, dtype),
    ]
    return _call(
        kernel,
        jax.ShapeDtypeStruct(shape, dtype),
        (e_count, lmax, fp // gs),
        args,
        interpret,
        num_warps,
        num_stages,
        "bitsmoe_dequantize_tiles",
        aliases={len(args) - 1: 0},
    )
