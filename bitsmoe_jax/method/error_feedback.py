"""GPTQ-style error feedback for the spectral factors ("rounding = gptq").

BitsMoE's allocation decides how many bits each unit (one spectral component of one expert) gets;
rounding every unit to its grid on its own ("nearest") leaves the errors of different components
uncorrelated, while the expert's outputs see their *sum*. GPTQ's observation carries over to the
spectral domain, with Hessians of the tokens routed to the expert (weighted by the routing weight
squared, as the token-sum loss weighs them):

* gate / up, ``g = z · A[e]`` with ``z = x Ṽ`` and the factor ``A[e]`` ``[r, F]``: the units are the
  *rows* of A — the contraction dimension. With ``H = Σ_{t→e} w_t² z_t z_tᵀ`` (r × r), row k is
  rounded and its error pushed onto the rows not yet rounded through the upper Cholesky factor U of
  H⁻¹ (``err = (a_k − q(a_k)) / U[k,k]``, ``a_j −= U[k,j] · err``), in GPTQ's lazy batches: within a
  block of `ROW_BLOCK` rows only the block is updated, and its errors reach all later rows in one
  matmul at the block's end (the same sums in another order). Rows go in ascending bit-width:
  dropped (0-bit) components first, so their content folds into the kept ones, and the most precise
  rows last. Each row's group scales are searched on the row as it stands when its turn comes, so
  packing the compensated rows reproduces the feedback's rounding exactly.
* down, ``acc = h · Bd[e]ᵀ`` with ``Bd[e]`` ``[r, F]``: the units are rows along the contraction F,
  so the feedback runs over the *columns* f with ``H = Σ_{t→e} w_t² h_t h_tᵀ`` (F × F), ``h_t`` the
  expert's unquantized hidden activation. This is GPTQ with groups: a group's scales (one per row,
  searched with the loss weights) are fixed when its first column is reached, its later columns
  are then rounded on them after the earlier columns' errors have reached them; the scales are
  returned and packing uses them as they are (`packing.pack_segments(..., scales=...)`).

Dead directions (``H_kk = 0``) get ``H_kk = 1`` and ``damp · mean(diag H)`` is added to the
diagonal, as in GPTQ. An expert routed fewer than ``min_tokens`` tokens uses every token of the
layer, scaled to the mean routed mass of the others (the starved-expert fallback of the statistics).

What does not change: the bits (the allocation still uses the loss coefficients of independent
rounding — an upper bound of what the feedback achieves), the grid, the stored format and so the
effective bits. Memory: Hessians are built one expert at a time from the layer's calibration inputs
(``CalibrationInputs``), never all experts' at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import quantizers as qz
from bitsmoe_jax.method.inverse_factor import upper_inverse_cholesky
from bitsmoe_jax.models.moe import PLAIN, ExpertFn, GluActivation

HI = jax.lax.Precision.HIGHEST
# Rows rounded one at a time within a block, whose errors then reach all later rows in one matmul
# (GPTQ's lazy batch updates): each step touches ``block × F`` values instead of ``r × F``.
ROW_BLOCK = 128


@dataclasses.dataclass
class CalibrationInputs:
    """What the feedback needs of a layer's calibration: MoE inputs and the router's choices."""

    x: np.ndarray  # [N, D] float32
    expert_idx: np.ndarray  # [N, k] int32
    expert_w: np.ndarray  # [N, k] float32
    min_tokens: int = 16

    def __post_init__(self) -> None:
        idx, w = np.asarray(self.expert_idx), np.asarray(self.expert_w)
        if idx.shape != w.shape or idx.ndim != 2 or idx.shape[0] != np.shape(self.x)[0]:
            raise ValueError(
                f"expert_idx {idx.shape} / expert_w {w.shape} must both be "
                f"[N={np.shape(self.x)[0]}, k]"
            )

    def starved(self, expert: int) -> bool:
        """Routed fewer than `min_tokens` tokens: calibrated on every token instead."""
        return int((np.asarray(self.expert_idx) == expert).any(1).sum()) < self.min_tokens

    def token_weights(self, expert: int) -> np.ndarray:
        """Squared routing weight of every token for `expert` ([N], float64), with the starved
        fallback."""
        idx, w = np.asarray(self.expert_idx), np.asarray(self.expert_w, np.float64)
        if not self.starved(expert):
            return np.where(idx == expert, w, 0.0).sum(1) ** 2
        per_expert = [np.where(idx == e, w, 0.0).sum(1) ** 2 for e in np.unique(idx)]
        masses = [float(m.sum()) for m in per_expert if (m > 0).sum() >= self.min_tokens]
        target = float(np.mean(masses)) if masses else 1.0
        return np.full(idx.shape[0], target / max(idx.shape[0], 1))


def _checked(units, bits, hessian, weights, along: str):
    """float32 units [r, F], int32 bits [r], float32 Hessian ([r, r] along rows, [F, F] along
    columns), weights."""
    units = np.asarray(units, np.float32)
    r, f = units.shape
    n, name = (r, "r") if along == "rows" else (f, "F")
    hessian = np.asarray(hessian, np.float32)
    if hessian.shape != (n, n):
        raise ValueError(f"hessian must be [{name}={n}, {name}={n}], got {hessian.shape}")
    w = (
        np.ones_like(units)
        if weights is None
        else np.broadcast_to(np.asarray(weights, np.float32), units.shape)
    )
    return units, np.asarray(bits, np.int32).reshape(r), hessian, w


def compensate_rows(
    units: np.ndarray,
    bits: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    weights: np.ndarray | None = None,
    damp: float = 0.01,
    block: int = ROW_BLOCK,
) -> np.ndarray:
    """Rows of one factor ``[r, F]`` after error feedback along rows (gate / up); float32 ``[r,
    F]``.

    ``bits [r]`` (any of `quantizers.SUPPORTED_BITS`), ``hessian [r, r]`` in component coordinates,
    ``weights [r, F]`` the per-element loss weights the group scales are searched with. Row k of the
    result is row k as it stands when rounded; packing it with the same bits, weights and group size
    reproduces the feedback's rounding.
    """
    units, bits, hessian, w = _checked(units, bits, hessian, weights, along="rows")
    order = np.argsort(bits, kind="stable")
    out = np.asarray(
        _rows(
            jnp.asarray(units[order]),
            jnp.asarray(bits[order]),
            jnp.asarray(hessian[np.ix_(order, order)]),
            jnp.asarray(w[order]),
            jnp.float32(damp),
            group_size=int(group_size),
            block=int(block),
        )
    )
    result = np.empty_like(out)
    result[order] = out
    # A Hessian that damping cannot make positive definite gives NaNs: keep nearest rounding then.
    return result if np.isfinite(result).all() else units


def compensate_columns(
    units: np.ndarray,
    bits: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    weights: np.ndarray | None = None,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[r, F]`` after error feedback along columns (down), and the group scales they use.

    Returns ``(values [r, F], scales [r, n_groups])``: packing ``values`` on ``scales`` (bits 1..8)
    gives the feedback's codes; 0-bit rows are zeros and 16-bit rows bf16 either way (their scales
    are 0). If the Hessian factor is not finite, the units come back unchanged with the scales the
    nearest rounding would search — i.e. nearest rounding.
    """
    units, bits, hessian, w = _checked(units, bits, hessian, weights, along="columns")
    args = (jnp.asarray(units), jnp.asarray(bits), jnp.asarray(w))
    vals, scales = _columns(
        args[0],
        args[1],
        jnp.asarray(hessian),
        args[2],
        jnp.float32(damp),
        group_size=int(group_size),
    )
    vals, scales = np.asarray(vals), np.asarray(scales)
    if np.isfinite(vals).all() and np.isfinite(scales).all():
        return vals, scales
    return units, np.asarray(_nearest_scales(*args, group_size=int(group_size)))


# ---------------------------------------------------------------------------------------- kernels
def _upper_inverse_factor(h: jax.Array, damp: jax.Array, pad: int = 0) -> jax.Array:
    """U with H⁻¹ = UᵀU (upper), after the dead-direction fix and damping, for ``H`` padded by
    ``pad``
    trailing directions with an identity block (size ``n + pad``). Padded directions come last, so
    they reach no real one, and the real block of U is U of the unpadded H: the damping is the mean
    over the real diagonal only."""
    n = h.shape[0]
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag((jnp.arange(n + pad) >= n).astype(jnp.float32))
    diag = jnp.diagonal(h)
    h = h + jnp.diag((diag <= 0).astype(jnp.float32))
    real = jnp.arange(n + pad) < n
    mean = jnp.sum(jnp.where(real, jnp.diagonal(h), 0.0)) / jnp.maximum(jnp.sum(real), 1)
    return upper_inverse_cholesky(h + damp * mean * jnp.eye(n + pad, dtype=jnp.float32))


def _round_on(x: jax.Array, s: jax.Array, bits: jax.Array) -> jax.Array:
    """Reconstruction of values ``x`` on scales ``s`` at traced bit-widths (0, 1..8, 16),
    elementwise."""
    lo, hi, _ = qz._int_params(jnp.clip(bits, 1, 8))
    deq = (2.0 * qz._nearest_codes(x, s, lo, hi) + 1.0) * s
    deq = jnp.where(s > 0, deq, 0.0)
    return jnp.where(
        bits == 0, 0.0, jnp.where(bits >= 16, x.astype(jnp.bfloat16).astype(jnp.float32), deq)
    )


def _search(xg: jax.Array, wg: jax.Array, bits: jax.Array) -> jax.Array:
    """Group scales ``[..., ng]`` at traced bit-widths; 0 for 0- and 16-bit units (no scales)."""
    s = qz._search_scales(xg, wg, jnp.clip(bits, 1, 8))
    return jnp.where(((bits >= 1) & (bits <= 8))[..., None], s, 0.0)


@functools.partial(jax.jit, static_argnames=("group_size", "block"))
def _rows(a, b, h, w, damp, *, group_size: int, block: int):
    r, f = a.shape
    bs = min(block, r)
    nb = -(-r // bs)
    pad = nb * bs - r
    # Padded rows: zero values at 0 bits, an identity Hessian block (`_upper_inverse_factor`).
    a = jnp.pad(a, ((0, pad), (0, 0)))
    w = jnp.pad(w, ((0, pad), (0, 0)), constant_values=1.0)
    b = jnp.pad(b, (0, pad))
    u = _upper_inverse_factor(h, damp, pad)
    rows = jnp.arange(r + pad)
    inner = jnp.arange(bs)

    def block_step(bi, a):
        r0 = bi * bs
        blk = jax.lax.dynamic_slice(a, (r0, 0), (bs, f))
        wb = jax.lax.dynamic_slice(w, (r0, 0), (bs, f))
        bb = jax.lax.dynamic_slice(b, (r0,), (bs,))
        ub = jax.lax.dynamic_slice(u, (r0, r0), (bs, bs))

        def step(j, c):
            blk, errs = c
            xg, wg, _ = qz._grouped(blk[j][None], wb[j][None], group_size)  # [1, ng, G]
            s = _search(xg, wg, bb[j])[0]  # [ng]
            s_full = jnp.repeat(s, xg.shape[-1])[:f]
            err = (blk[j] - _round_on(blk[j], s_full, bb[j])) / ub[j, j]
            blk = blk - jnp.where(inner > j, ub[j], 0.0)[:, None] * err[None, :]
            return blk, errs.at[j].set(err)

        blk, errs = jax.lax.fori_loop(0, bs, step, (blk, jnp.zeros((bs, f), jnp.float32)))
        a = jax.lax.dynamic_update_slice(a, blk, (r0, 0))
        # the block's errors reach the later rows at once: a_j −= Σ_k U[k, j]·err_k (k in the block)
        urows = jax.lax.dynamic_slice(u, (r0, 0), (bs, r + pad))
        return a - jnp.matmul(jnp.where(rows[None, :] >= r0 + bs, urows, 0.0).T, errs, precision=HI)

    return jax.lax.fori_loop(0, nb, block_step, a)[:r]


@functools.partial(jax.jit, static_argnames=("group_size",))
def _columns(a, b, h, w, damp, *, group_size: int):
    r, f = a.shape
    g = min(group_size, f)
    ng = -(-f // g)
    fp = ng * g
    pad = fp - f
    # Padded columns: zero values and weights, an identity Hessian block — rounded last, they reach
    # no real column.
    a = jnp.pad(a, ((0, 0), (0, pad)))
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = _upper_inverse_factor(h, damp, pad)
    cols = jnp.arange(fp)
    inner = jnp.arange(g)

    def block(gi, carry):
        a, vals, scales = carry
        f0 = gi * g
        blk = jax.lax.dynamic_slice(a, (0, f0), (r, g))
        wb = jax.lax.dynamic_slice(w, (0, f0), (r, g))
        s = _search(blk[:, None, :], wb[:, None, :], b)[:, 0]  # [r]
        ub = jax.lax.dynamic_slice(u, (f0, f0), (g, g))

        def col(j, c):
            blk, errs = c
            x = blk[:, j]
            err = (x - _round_on(x, s, b)) / ub[j, j]
            blk = blk - err[:, None] * jnp.where(inner > j, ub[j], 0.0)[None, :]
            return blk, errs.at[:, j].set(err)

        blk, errs = jax.lax.fori_loop(0, g, col, (blk, jnp.zeros((r, g), jnp.float32)))
        vals = jax.lax.dynamic_update_slice(vals, blk, (0, f0))
        urows = jax.lax.dynamic_slice(u, (f0, 0), (g, fp))
        a = a - jnp.matmul(errs, jnp.where(cols[None, :] >= f0 + g, urows, 0.0), precision=HI)
        return a, vals, scales.at[:, gi].set(s)

    _, vals, scales = jax.lax.fori_loop(
        0, ng, block, (a, jnp.zeros_like(a), jnp.zeros((r, ng), jnp.float32))
    )
    return vals[:, :f], scales


@functools.partial(jax.jit, static_argnames=("group_size",))
def _nearest_scales(a, b, w, *, group_size: int):
    xg, wg, _ = qz._grouped(a, w, group_size)
    return _search(xg, wg, b)


@jax.jit
def _weighted_gram(z: jax.Array, w2: jax.Array) -> jax.Array:
    return jnp.matmul((z * w2[:, None]).T, z, precision=HI)


@jax.jit
def _hidden(zg: jax.Array, zu: jax.Array, ag: jax.Array, au: jax.Array) -> jax.Array:
    return jax.nn.silu(jnp.matmul(zg, ag, precision=HI)) * jnp.matmul(zu, au, precision=HI)


@functools.partial(jax.jit, static_argnames=("act",))
def hidden_glu(zg, zu, ag, au, bg, bu, act: GluActivation) -> jax.Array:
    """`_hidden` with biases [F] before any gated activation (GPT-OSS's clamped one too)."""
    return act(jnp.matmul(zg, ag, precision=HI) + bg, jnp.matmul(zu, au, precision=HI) + bu)


def basis_inputs(
    x: np.ndarray | jax.Array, bases: dict[str, np.ndarray | None]
) -> dict[str, jax.Array]:
    """The calibration tokens [N, D] through the dequantized gate/up bases ([N, r]; x itself
    without a basis): what every expert's gate/up statistics start from, computed once a layer."""
    xj = jnp.asarray(x, jnp.float32)
    return {
        p: xj
        if bases[p] is None
        else jnp.matmul(xj, jnp.asarray(bases[p], jnp.float32), precision=HI)
        for p in ("gate", "up")
    }


def routed_rows(w2_all: np.ndarray) -> tuple[np.ndarray, int]:
    """(The tokens that reach an expert — all, if starved — padded with token 0 to a power of two
    so that programs compile once per size bucket, not once per expert; how many are real)."""
    keep = np.flatnonzero(w2_all > 0)
    bucket = 1 << max(int(keep.size) - 1, 0).bit_length()
    return np.concatenate([keep, np.zeros(bucket - keep.size, keep.dtype)]), int(keep.size)


# ---------------------------------------------------------------------------------------- a layer
def feedback_layer(
    units: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    bases: dict[str, np.ndarray | None],
    calib: CalibrationInputs,
    bits: dict[str, np.ndarray],
    group_size: int,
    damp: float = 0.01,
    experts: Sequence[int] | None = None,
    ids: Sequence[int] | None = None,
    fn: ExpertFn = PLAIN,
    z: dict[str, jax.Array] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Compensated units of a layer: ``{p: (values [E, r, F], down scales [E, r, ng] or None)}``.

    units / weights ``[E, r, F]`` per projection (all r components, before dropping), bases the
    dequantized ``[D, r]`` bases (None = identity), bits ``[E, r]``. One expert's Hessians at a
    time. ``experts``: compensate only these (the others' entries are zeros) — a multi-process run
    gives each process its own experts and all-gathers the results; every expert's result depends on
    that expert's inputs only, so it is the same whichever process computes it. ``ids``: the
    experts the rows of ``units`` are (a streamed chunk; default: row e is expert e). ``fn``: the
    experts' activation and biases, which the down projection's inputs go through (GPT-OSS).
    ``z``: `basis_inputs` of the calibration tokens, when the caller has them (one per layer).
    """
    if z is None:
        z = basis_inputs(calib.x, bases)
    e_count = units["gate"].shape[0]
    out = {p: np.zeros(np.shape(units[p]), np.float32) for p in ("gate", "up", "down")}
    down_scales = None
    for e in range(e_count) if experts is None else experts:
        w2_all = calib.token_weights(e if ids is None else int(ids[e]))
        # Only the tokens that reach the expert, the padding weighted zero.
        keep, real = routed_rows(w2_all)
        w2k = jnp.asarray(np.where(np.arange(keep.size) < real, w2_all[keep], 0.0), jnp.float32)
        for p in ("gate", "up"):
            hz = np.asarray(_weighted_gram(z[p][keep], w2k))
            out[p][e] = compensate_rows(
                units[p][e], bits[p][e], hz, group_size, weights[p][e], damp
            )
        hidden_in = (
            z["gate"][keep],
            z["up"][keep],
            jnp.asarray(units["gate"][e]),
            jnp.asarray(units["up"][e]),
        )
        if fn.plain:
            h = _hidden(*hidden_in)
        else:
            eid = np.asarray([e if ids is None else int(ids[e])])
            f_width = np.shape(units["gate"])[-1]
            bg, bu = (
                np.zeros(f_width, np.float32) if fn.bias is None else fn.rows(p, eid)[0]
                for p in ("gate", "up")
            )
            h = hidden_glu(*hidden_in, jnp.asarray(bg), jnp.asarray(bu), act=fn.act)
        hd = np.asarray(_weighted_gram(h, w2k))
        vals, sc = compensate_columns(
            units["down"][e], bits["down"][e], hd, group_size, weights["down"][e], damp
        )
        out["down"][e] = vals
        if down_scales is None:
            down_scales = np.zeros((e_count, *sc.shape), np.float32)
        down_scales[e] = sc
    if down_scales is None:  # no expert to compensate here: the scales' shape, for the all-gather
        r, f = np.shape(units["down"])[1:]
        down_scales = np.zeros((e_count, r, qz.num_groups(f, min(group_size, f))), np.float32)
    return {
        "gate": (out["gate"], None),
        "up": (out["up"], None),
        "down": (out["down"], down_scales),
    }


__all__ = [
    "CalibrationInputs",
    "basis_inputs",
    "compensate_rows",
    "compensate_columns",
    "feedback_layer",
    "hidden_glu",
    "routed_rows",
]
