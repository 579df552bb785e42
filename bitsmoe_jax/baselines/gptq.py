"""GPTQ (Frantar et al., 2022) for routed experts: per-expert Hessians, uniform bits.

Layout. Our weights are used as ``y = x @ w`` with ``w`` of shape [K, N] (input dimension first),
so the "columns" of the PyTorch [N, K] weight that GPTQ quantizes one after another are our *rows*
``k``. Every output column ``n`` is an independent least-squares problem sharing the Hessian
``H = Σ_t x_t x_tᵀ`` [K, K]; GPTQ quantizes row k, and pushes the rounding error onto the rows not
yet quantized through row k of the upper Cholesky factor U of H⁻¹ (``H⁻¹ = UᵀU``):

    err_k = (w_k - q(w_k)) / U[k, k];   w_j -= U[k, j] · err_k   for j > k.

Lazy batch updates: rows are processed in blocks of ``block_size``; inside a block only the block's
rows are updated, and the block's accumulated errors reach all later rows with one matmul at the end
of the block. This is the same arithmetic in a different order, so blocked and unblocked agree to
float rounding.

Grid. The same grids as our RTN (`bitsmoe_jax.baselines.rtn`), one per (group of ``group_size``
consecutive input rows, output column): symmetric integers in [-2^(b-1), 2^(b-1)-1] times a bf16
scale max|w| / (2^(b-1)-1), or (``zero_point=True``, the GPTQ reference code's default) integers in
[0, 2^b-1] minus a b-bit zero point, times a bf16 scale (max - min) / (2^b-1) over the group's range
extended to contain 0. As in GPTQ with a group size, a
group's scale is computed from the group's *current* weights (already updated by the errors of every
earlier row) when its first row is reached. To make that well defined with lazy updates the block
size is adjusted (statically) so that every group either lies inside one block or starts at a block
boundary; then the rows of a group are always up to date at its start, and blocked equals unblocked.

Other GPTQ details kept: dead inputs (H_kk = 0) get H_kk = 1 and their weight rows are zeroed;
dampening ``damp · mean(diag H)`` is added to the diagonal; optional act-order quantizes rows in
order of descending diag(H) (the permutation is taken after the dead-input fix; ties keep index
order) and un-permutes the result. With act-order *and* groups, groups are runs of ``group_size``
consecutive rows of the **permuted** order (GPTQ's default, not "static groups"): each scale is then
shared by the inputs of one permuted group, so a storage format must also keep the permutation
(here it is only a fake-quantization baseline; ``bpw`` counts the scales only, as for RTN).

Effective bits per weight: ``bits + 16 / group_size`` (``+ bits / group_size`` with a zero point).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method.inverse_factor import upper_inverse_cholesky

HI = jax.lax.Precision.HIGHEST


def _effective_block(k: int, group_size: int, block_size: int) -> int:
    """Block size ≤ block_size such that every group is inside a block or starts at a block
    start."""
    bs = max(1, min(block_size, k))
    if group_size <= bs:
        return (bs // group_size) * group_size
    return max(d for d in range(1, bs + 1) if group_size % d == 0)


def act_order_permutation(hessian: Any) -> np.ndarray:
    """The row order act-order uses: descending diag(H) after dead inputs get H_kk = 1 (stable)."""
    d = np.diag(np.asarray(hessian, np.float32)).copy()
    d[d == 0] = 1.0
    return np.argsort(-d, kind="stable")


def _bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _group_grid(
    gmin: jax.Array, gmax: jax.Array, bits: int, zero_point: bool
) -> tuple[jax.Array, jax.Array]:
    """(scale, zero) per output column from the group's current min / max (zero = 0 when
    symmetric)."""
    if not zero_point:
        return _bf16(jnp.maximum(gmax, -gmin) / (2 ** (bits - 1) - 1)), jnp.zeros_like(gmax)
    lo, hi = jnp.minimum(gmin, 0.0), jnp.maximum(gmax, 0.0)
    scale = _bf16((hi - lo) / (2**bits - 1))
    safe = jnp.where(scale > 0, scale, 1.0)
    return scale, jnp.where(scale > 0, jnp.clip(jnp.round(-lo / safe), 0, 2**bits - 1), 0.0)


def _grid_round(
    w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int, zero_point: bool
) -> jax.Array:
    safe = jnp.where(scale > 0, scale, 1.0)
    if zero_point:
        return (jnp.clip(jnp.round(w / safe) + zero, 0, 2**bits - 1) - zero) * scale
    return jnp.clip(jnp.round(w / safe), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


@functools.partial(
    jax.jit, static_argnames=("bits", "group_size", "block_size", "act_order", "zero_point")
)
def _gptq(
    w: jax.Array,
    h: jax.Array,
    damp: jax.Array,
    *,
    bits: int,
    group_size: int,
    block_size: int,
    act_order: bool,
    zero_point: bool = False,
) -> jax.Array:
    k, n = w.shape
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)

    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w = w[perm]
        h = h[perm][:, perm]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=jnp.float32)

    u = upper_inverse_cholesky(h)  # H⁻¹ = UᵀU, U upper

    bs = _effective_block(k, group_size, block_size)
    rows = np.arange(k)
    gid = rows // group_size
    scale = jnp.zeros((n,), jnp.float32)
    zero = jnp.zeros((n,), jnp.float32)
    q_blocks = []
    for b0 in range(0, k, bs):
        b1 = min(b0 + bs, k)
        nb = b1 - b0
        r = rows[b0:b1]
        gstart = jnp.asarray(r % group_size == 0)
        gmask = jnp.asarray(gid[b0:b1, None] == gid[None, b0:b1])  # [nb, nb] same group
        # A group that starts here and runs past the block (only at a block start): the rest of its
        # rows have received every earlier block's update, so their current values are final inputs.
        # Extremes of the group's rows past this block (0 is neutral: both grids' ranges contain 0).
        ext_hi = jnp.zeros((nb, n), jnp.float32)
        ext_lo = jnp.zeros((nb, n), jnp.float32)
        g_end = min((b0 // group_size + 1) * group_size, k)
        if b0 % group_size == 0 and g_end > b1:
            ext_hi = ext_hi.at[0].set(jnp.max(w[b1:g_end], axis=0))
            ext_lo = ext_lo.at[0].set(jnp.min(w[b1:g_end], axis=0))
        u1 = u[b0:b1, b0:b1]
        idx = jnp.arange(nb)

        def body(
            i, carry, u1=u1, gstart=gstart, gmask=gmask, ext_hi=ext_hi, ext_lo=ext_lo, idx=idx
        ):
            w1, q1, e1, sc, zp = carry
            wi = w1[i]
            in_group = gmask[i][:, None]
            gmax = jnp.maximum(jnp.max(jnp.where(in_group, w1, 0.0), axis=0), ext_hi[i])
            gmin = jnp.minimum(jnp.min(jnp.where(in_group, w1, 0.0), axis=0), ext_lo[i])
            new_sc, new_zp = _group_grid(gmin, gmax, bits, zero_point)
            sc = jnp.where(gstart[i], new_sc, sc)
            zp = jnp.where(gstart[i], new_zp, zp)
            qi = _grid_round(wi, sc, zp, bits, zero_point)
            err = (wi - qi) / u1[i, i]
            coef = jnp.where(idx > i, u1[i], 0.0)
            w1 = w1 - coef[:, None] * err[None, :]
            return w1, q1.at[i].set(qi), e1.at[i].set(err), sc, zp

        init = (
            w[b0:b1],
            jnp.zeros((nb, n), jnp.float32),
            jnp.zeros((nb, n), jnp.float32),
            scale,
            zero,
        )
        _, q1, e1, scale, zero = jax.lax.fori_loop(0, nb, body, init)
        q_blocks.append(q1)
        if b1 < k:
            w = w.at[b1:].add(-jnp.matmul(u[b0:b1, b1:].T, e1, precision=HI))
    q = jnp.concatenate(q_blocks, axis=0)
    if act_order:
        q = q[jnp.argsort(perm)]
    return q


def gptq_quantize_matrix(
    w: Any,
    hessian: Any,
    bits: int,
    group_size: int | None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    zero_point: bool = False,
) -> jax.Array:
    """GPTQ-quantize ``w`` [K, N] (``y = x @ w``) against ``hessian`` [K, K] = Σ x xᵀ; float32 [K,
    N].

    group_size: input rows per scale (None or ≤ 0: one group of all K rows). The result is
    fake-quantized: every value is an integer in [-2^(b-1), 2^(b-1)-1] times its group's bf16 scale,
    or with ``zero_point`` (q - zero) · scale with q in [0, 2^b-1].
    """
    k = np.shape(w)[0]
    gs = k if group_size is None or group_size <= 0 else int(group_size)
    return _gptq(
        jnp.asarray(w),
        jnp.asarray(hessian),
        jnp.float32(damp),
        bits=int(bits),
        group_size=gs,
        block_size=int(block_size),
        act_order=bool(act_order),
        zero_point=bool(zero_point),
    )


def expert_inputs(
    x: Any,
    expert_idx: Any,
    expert_w: Any,
    gate: Any,
    up: Any,
    num_experts: int,
    min_tokens: int = 16,
) -> Iterator[tuple[int, jax.Array, jax.Array, int]]:
    """``(e, x_e [n, D], h_e [n, F], routed-token count)`` for each expert: the inputs of its
    gate/up
    and of its down, over the tokens routed to it — or over every token when fewer than
    ``min_tokens`` were (the starved fallback: count < min_tokens). ``h = silu(x gate) · (x up)`` of
    the unquantized expert. ``expert_w`` is only checked for shape (see `expert_hessians`)."""
    x = jnp.asarray(x, jnp.float32)
    idx = np.asarray(expert_idx)
    if np.shape(expert_w) != idx.shape or idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx {idx.shape} / expert_w {np.shape(expert_w)} must both be [N={x.shape[0]}, "
            "k]"
        )
    gate = jnp.asarray(gate, jnp.float32)
    up = jnp.asarray(up, jnp.float32)
    for e in range(num_experts):
        tok = np.nonzero((idx == e).any(axis=1))[0]
        xe = x if tok.size < min_tokens else x[tok]
        yield (
            e,
            xe,
            jax.nn.silu(jnp.matmul(xe, gate[e], precision=HI))
            * jnp.matmul(xe, up[e], precision=HI),
            int(tok.size),
        )


def expert_hessians(
    x: Any,
    expert_idx: Any,
    expert_w: Any,
    gate: Any,
    up: Any,
    num_experts: int,
    min_tokens: int = 16,
) -> tuple[jax.Array, jax.Array, np.ndarray, list[int]]:
    """Per-expert GPTQ Hessians from the calibration tokens routed to each expert.

    x [N, D] layer inputs of the routed experts; expert_idx / expert_w [N, k] the router's choices.
    H_in[e] = Σ_{t→e} x_t x_tᵀ [D, D] (shared by gate and up), H_down[e] = Σ_{t→e} h_t h_tᵀ [F, F]
    with h_t = silu(x_t @ gate[e]) * (x_t @ up[e]) from the unquantized expert.

    The Hessians are *not* weighted by the routing weight: the weight only scales the expert's
    output, and GPTQ's objective is the expert's own layer output ‖X W - X Ŵ‖² over its tokens
    (as in GPTQ-for-MoE practice). ``expert_w`` is therefore only checked for shape.

    Starved experts (fewer than ``min_tokens`` routed tokens) would get a rank-deficient Hessian
    dominated by dampening; as a documented fallback they use *every* token of the layer (H_down
    then uses h computed by that expert on all tokens). Returns (H_in [E, D, D], H_down [E, F, F],
    tokens [E] routed-token counts before the fallback, starved expert ids).
    """
    h_in, h_down = [], []
    tokens, starved = np.zeros(num_experts, np.int64), []
    for e, xe, he, routed in expert_inputs(
        x, expert_idx, expert_w, gate, up, num_experts, min_tokens
    ):
        tokens[e] = routed
        if routed < min_tokens:
            starved.append(e)
        h_in.append(jnp.matmul(xe.T, xe, precision=HI))
        h_down.append(jnp.matmul(he.T, he, precision=HI))
    return jnp.stack(h_in), jnp.stack(h_down), tokens, starved


def gptq_quantize_experts(
    gate: Any,
    up: Any,
    down: Any,
    x: Any,
    expert_idx: Any,
    expert_w: Any,
    bits: int,
    group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    min_tokens: int = 16,
    block_size: int = 128,
    zero_point: bool = False,
) -> dict[str, Any]:
    """GPTQ every routed expert of one MoE layer: gate/up [E, D, F] against H_in, down [E, F, D]
    against H_down.

    Gate and up share H_in and GPTQ treats output columns independently, so they are quantized as
    one [D, 2F] matrix per expert (identical to quantizing them separately). Returns
    dict(gate, up, down (input dtypes), starved=[expert ids on the all-token fallback],
    tokens=[E] routed-token counts, bpw=bits + (16 [+ bits with a zero point])/group_size).
    """
    gate_a, up_a, down_a = jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down)
    e, d, f = gate_a.shape
    h_in, h_down, tokens, starved = expert_hessians(
        x, expert_idx, expert_w, gate_a, up_a, e, min_tokens
    )

    def quant(w_stack: jax.Array, h_stack: jax.Array) -> jax.Array:
        return jax.vmap(
            lambda w, h: gptq_quantize_matrix(
                w, h, bits, group_size, damp, act_order, block_size, zero_point
            )
        )(w_stack.astype(jnp.float32), h_stack)

    gu = quant(jnp.concatenate([gate_a, up_a], axis=-1), h_in)
    dq = quant(down_a, h_down)
    if not (bool(jnp.all(jnp.isfinite(gu))) and bool(jnp.all(jnp.isfinite(dq)))):
        raise FloatingPointError(
            "GPTQ produced non-finite weights (Hessian not positive definite after dampening?)"
        )
    return dict(
        gate=gu[..., :f].astype(gate_a.dtype),
        up=gu[..., f:].astype(up_a.dtype),
        down=dq.astype(down_a.dtype),
        starved=starved,
        tokens=tokens,
        bpw=float(bits + (16.0 + (bits if zero_point else 0)) / group_size),
    )
