"""GPTQ-style error feedback for the spectral factors of gate and up ("rounding = gptq").

BitsMoE's allocation decides how many bits each unit (one spectral component of one expert) gets;
rounding each unit to its grid independently ("nearest") leaves the errors of different components
uncorrelated, while the expert's pre-activations ``g = z · A[e]`` (``z = x Ṽ``, ``A[e]`` the
``[r, F]`` factor, one row per component) see their *sum*. GPTQ's observation applies unchanged in
the spectral domain: with the Hessian of the routed inputs in component coordinates,

    H[e] = Σ_{t→e} w_t² z_t z_tᵀ  (r × r; w_t the routing weight, as in the token-sum loss),

quantizing row k and pushing its error onto the rows not yet quantized through the upper Cholesky
factor U of H⁻¹ (``err_k = (a_k − q(a_k)) / U[k,k]``, ``a_j −= U[k,j] · err_k`` for later j)
minimises ``Σ_t w_t² ‖z_t (A − Â)‖²`` greedily, row by row. Rows are taken in ascending bit-width,
so dropped (0-bit) components go first and their content is folded into the components that are
kept, and the most precise rows come last and absorb the accumulated error.

What this changes and what it does not:
* the bits, the grid, the group scales' criterion and the stored format are those of "nearest": the
  compensated rows are then packed exactly as before (`packing.pack_segments` with the same per-element
  weights), so effective bits are unchanged;
* the allocation still uses loss coefficients of independent rounding (an upper bound on what error
  feedback then achieves);
* only gate and up: their rows are the contraction dimension of a product with a shared per-expert
  input, which is what GPTQ needs. Down's units run along the contraction (F), so its feedback would
  be GPTQ over F with groups — left to the nearest rounding here.

Dead components (``H_kk = 0``) get ``H_kk = 1``; ``damp · mean(diag H)`` is added to the diagonal, as
in GPTQ. Experts routed fewer than ``min_tokens`` tokens use every token of the layer (the same
starved-expert fallback as the statistics), so their Hessian is not dominated by damping.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.quant import quantizers as qz

HI = jax.lax.Precision.HIGHEST


def expert_input_hessians(
    x: jax.Array, expert_idx: jax.Array, expert_w: jax.Array, num_experts: int, min_tokens: int = 16
) -> np.ndarray:
    """``[E, D, D]`` float32: ``Σ_{t→e} w_t² x_t x_tᵀ`` over the tokens routed to each expert.

    x: MoE-block input ``[N, D]``; expert_idx / expert_w: ``[N, k]`` as the model routes. An expert
    with fewer than ``min_tokens`` routed tokens gets ``Σ_t x_t x_tᵀ`` over all tokens, scaled to the
    mean routed mass of the others (its direction information, at a typical weight).
    """
    x = jnp.asarray(x, jnp.float32)
    idx = np.asarray(expert_idx)
    w = np.asarray(expert_w, np.float32)
    if idx.shape != w.shape or idx.ndim != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"expert_idx {idx.shape} / expert_w {w.shape} must both be [N={x.shape[0]}, k]")
    # Routing weight of each token for each expert (0 when not routed there): [N, E].
    weight = np.zeros((idx.shape[0], num_experts), np.float32)
    np.put_along_axis(weight, idx, w, axis=1)
    hess = np.array(_weighted_grams(x, jnp.asarray(weight**2)))  # a writable copy
    counts = (weight > 0).sum(0)
    starved = np.flatnonzero(counts < min_tokens)
    if starved.size:
        mass = (weight**2).sum(0)
        routed = mass[counts >= min_tokens]
        target = float(routed.mean()) if routed.size else 1.0
        full = np.asarray(jnp.matmul(x.T, x, precision=HI))
        for e in starved:
            hess[e] = full * (target / max(float(x.shape[0]), 1.0))
    return hess


@jax.jit
def _weighted_grams(x: jax.Array, w2: jax.Array) -> jax.Array:
    # One [D, D] Gram per expert; lax.map keeps memory at one expert's worth.
    return jax.lax.map(lambda col: jnp.matmul((x * col[:, None]).T, x, precision=HI), w2.T)


def component_hessian(input_hessian: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """``Ṽᵀ H Ṽ`` per expert (``[E, r, r]``); the identity basis (no shared basis) leaves H as is."""
    h = np.asarray(input_hessian, np.float64)
    if basis is None:
        return h.astype(np.float32)
    v = np.asarray(basis, np.float64)
    return np.einsum("dr,edk,ks->ers", v, h, v, optimize=True).astype(np.float32)


def compensate_rows(
    units: np.ndarray,
    bits: np.ndarray,
    hessian: np.ndarray,
    group_size: int,
    weights: np.ndarray | None = None,
    damp: float = 0.01,
) -> np.ndarray:
    """Rows to pack, after GPTQ error feedback: ``[E, r, F]`` float32.

    units ``[E, r, F]`` (rows = components), bits ``[E, r]`` (any of `quantizers.SUPPORTED_BITS`),
    hessian ``[E, r, r]`` in component coordinates, weights ``[E, r, F]`` the per-element loss weights
    used for the group scales (as in packing). Row k of the result is row k of the factor as it stands
    when it is quantized — already corrected for the errors of every row quantized before it — so
    packing it with the same bits, weights and group size reproduces the feedback's rounding.
    """
    units = np.asarray(units, np.float32)
    e, r, f = units.shape
    bits = np.asarray(bits, np.int32).reshape(e, r)
    hessian = np.asarray(hessian, np.float32)
    if hessian.shape != (e, r, r):
        raise ValueError(f"hessian must be [E={e}, r={r}, r={r}], got {hessian.shape}")
    w = np.ones_like(units) if weights is None else np.broadcast_to(np.asarray(weights, np.float32), units.shape)
    order = np.argsort(bits, axis=1, kind="stable")
    inv = np.argsort(order, axis=1)
    out = _compensate(
        jnp.asarray(np.take_along_axis(units, order[..., None], axis=1)),
        jnp.asarray(np.take_along_axis(bits, order, axis=1)),
        jnp.asarray(hessian[np.arange(e)[:, None, None], order[:, :, None], order[:, None, :]]),
        jnp.asarray(np.take_along_axis(w, order[..., None], axis=1)),
        jnp.float32(damp),
        group_size=int(group_size),
    )
    out = np.take_along_axis(np.asarray(out), inv[..., None], axis=1)
    # A Hessian that damping cannot make positive definite gives NaNs: that expert keeps its rows
    # (nearest rounding) rather than a corrupt factor.
    bad = ~np.isfinite(out).all(axis=(1, 2))
    out[bad] = units[bad]
    return out


def _quantize_row(row: jax.Array, weight: jax.Array, bits: jax.Array, group_size: int) -> jax.Array:
    """Reconstruction of one unit at a traced bit-width (0, 1..8 or 16), as packing would store it."""
    b_int = jnp.clip(bits, 1, 8)
    codes, scales = qz._quantize_int(row[None], weight[None], b_int, group_size)
    deq = qz._dequantize_int(codes, scales, group_size)[0]
    bf16 = row.astype(jnp.bfloat16).astype(jnp.float32)
    return jnp.where(bits == 0, 0.0, jnp.where(bits >= 16, bf16, deq))


@functools.partial(jax.jit, static_argnames=("group_size",))
def _compensate(units, bits, hessian, weights, damp, *, group_size: int):
    def one_expert(a, b, h, w):
        r = a.shape[0]
        diag = jnp.diagonal(h)
        h = h + jnp.diag((diag <= 0).astype(jnp.float32))
        h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(r, dtype=jnp.float32)
        lh = jnp.linalg.cholesky(h)
        hinv = jax.scipy.linalg.cho_solve((lh, True), jnp.eye(r, dtype=jnp.float32))
        u = jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T
        later = jnp.arange(r)

        def step(i, a):
            q = _quantize_row(a[i], w[i], b[i], group_size)
            err = (a[i] - q) / u[i, i]
            coef = jnp.where(later > i, u[i], 0.0)
            return a - coef[:, None] * err[None, :]

        return jax.lax.fori_loop(0, r, step, a)

    return jax.lax.map(lambda args: one_expert(*args), (units, bits, hessian, weights))


__all__ = ["expert_input_hessians", "component_hessian", "compensate_rows"]
