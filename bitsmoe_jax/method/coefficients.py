"""Units of one MoE layer and their loss coefficients L(e, k, b).

Layout (ours: gate/up [E, D, F] used as x @ W, down [E, F, D] used as h @ W). With shared bases
Vg, Vu, U ([D, r], stored quantized, used dequantized as Ṽ):

    gate[e] ≈ Ṽg @ Ag[e]        Ag[e] = pinv(Ṽg) @ gate[e]          [r, F]
    down[e] ≈ Bd[e]ᵀ @ Ũᵀ       Bd[e] = pinv(Ũ) @ down[e]ᵀ          [r, F]

so every projection's units are rows of an [E, r, F] array (unit (e, k) = row k, length F).
Factors are fitted to the *dequantized* bases (least squares), so quantized bases (4 bits by
default) lose nothing at full rank: Ṽ is square and invertible and the fit is exact.

Per-element loss weights (see calibration.py for S and c):
    gate:  W[e, k, f] = S_gate[e][f, k] · ‖down[e][f, :]‖²
    up:    W[e, k, f] = S_up[e][f, k]   · ‖down[e][f, :]‖²
    down:  W[e, k, f] = c_down[e][f]
then each expert's weights are multiplied by max(1, floor · mean(mass) / mass_e) — the
`expert_mass_floor` that keeps experts rarely routed on the calibration text from being zeroed.
L(e, k, b) = Σ_f W[e, k, f] (unit_f − Q_b(unit)_f)², exactly (every unit at every b) or sampled
(κ_b · ‖unit‖²_W with κ_b measured on a random sample of units).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.calibrate import ExpertStats
from bitsmoe_jax.method.quantizers import kappa_estimates, stored_bits, weighted_sq_norm
from bitsmoe_jax.method.sharded import ExpertLayout

PROJECTIONS = ("gate", "up", "down")


def fit_factors(
    basis_deq: np.ndarray,
    w: np.ndarray,
    experts: Sequence[int] | None = None,
    pinv: np.ndarray | None = None,
) -> np.ndarray:
    """Least-squares factors F with basis_deq @ F[e] ≈ w[e]; basis [D, r], w [E, D, F] -> [E, r, F].

    `experts`: fit only these (the others' factors are zeros), for runs sharded over processes.
    `pinv`: `basis_pinv(basis_deq)`, computed once per layer by callers that fit chunk by chunk."""
    # pinv, not a normal-equations solve: an 8-bit basis whose rows span a large dynamic range (the
    # whitened ablation) can lose columns to rounding and be rank-deficient.
    # float32 products, one expert at a time: the inverse is computed in float64 and stored in
    # float32, and the fit's float32 rounding (~1e-6 relative) is a thousand times below the finest
    # stored unit (bf16); float64 per expert would double the time and hold a float64 copy of each
    # expert's matrix (the issue-18 rule: float64 only for the D×D statistics, never per expert).
    pinv = basis_pinv(basis_deq) if pinv is None else pinv
    out = np.zeros((w.shape[0], pinv.shape[0], w.shape[2]), np.float32)
    for e in range(w.shape[0]) if experts is None else experts:
        np.matmul(pinv, np.asarray(w[e], np.float32), out=out[e])
    return out


# A square basis whose estimated reciprocal condition number is above this is inverted through its
# LU factors; below it (a basis that lost columns to rounding) the SVD pseudo-inverse decides.
INVERSE_RCOND = 1e-10


def basis_pinv(basis_deq: np.ndarray) -> np.ndarray:
    """The (pseudo-)inverse the factors are fitted with (`fit_factors`): computed in float64,
    returned in float32 (three of them stay alive through a layer: 0.6 GiB at hidden 7168).

    A full-rank basis is square, and the dequantized SVD basis is within int8 rounding of
    orthonormal, so its inverse is its pseudo-inverse and LU computes it in two n×n float64 arrays
    at a few percent of an SVD's time — at hidden 7168 an SVD pseudo-inverse took two
    minutes and ~8 n² of float64 workspace per basis, the peak of a DeepSeek-V3-sized layer. A
    rectangular (low-rank) or ill-conditioned basis takes the SVD pseudo-inverse, which drops the
    directions rounding made degenerate."""
    a = np.asarray(basis_deq)
    inv = _lu_inverse(a) if a.ndim == 2 and a.shape[0] == a.shape[1] and a.size else None
    if inv is None:
        inv = np.linalg.pinv(np.asarray(a, np.float64))
    return inv.astype(np.float32)


def _lu_inverse(a: np.ndarray) -> np.ndarray | None:
    """inv(a) through LAPACK getrf/getrs in Fortran-ordered float64 copies, or None when `a` is
    singular or its 1-norm reciprocal condition estimate (gecon) is below `INVERSE_RCOND`."""
    from scipy.linalg import lapack

    anorm = float(np.abs(a).sum(axis=0, dtype=np.float64).max())
    lu, piv, info = lapack.dgetrf(np.array(a, np.float64, order="F"), overwrite_a=1)
    if info != 0 or not np.isfinite(anorm) or anorm == 0.0:
        return None
    rcond, info = lapack.dgecon(lu, anorm, norm="1")
    if info != 0 or not rcond > INVERSE_RCOND:
        return None
    # getrs against the identity, not getri: the same inverse, and getri is unblocked (10× slower)
    # in the OpenBLAS builds numpy and scipy ship.
    inv, info = lapack.dgetrs(lu, piv, np.eye(a.shape[0], order="F"), overwrite_b=1)
    return inv if info == 0 else None


def layer_units(
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    bases_deq: dict[str, np.ndarray],
    experts: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The three [E, r, F] unit arrays of a layer, fitted to the dequantized bases (of `experts`
    only, if given)."""
    return {
        "gate": fit_factors(bases_deq["gate"], gate, experts),
        "up": fit_factors(bases_deq["up"], up, experts),
        "down": fit_factors(bases_deq["down"], np.swapaxes(down, 1, 2), experts),
    }


def mass_scale(mass: np.ndarray, floor: float) -> np.ndarray:
    """Per-expert multiplier raising each expert's routed mass to at least floor·mean."""
    mean = float(np.mean(mass))
    if floor <= 0 or mean <= 0:
        return np.ones_like(mass)
    return np.maximum(1.0, floor * mean / np.maximum(mass, 1e-30 * mean))


def loss_weights(
    stats: ExpertStats,
    down: np.ndarray,
    r: dict[str, int],
    expert_mass_floor: float,
    weighting: str = "token_sum",
) -> dict[str, np.ndarray]:
    """Per-element weights W[e, k, f] for the three projections (float32 [E, r, F]).

    weighting="token_sum" (the method): statistics summed over tokens, so routing frequency counts.
    weighting="expert_mean" (ablation): each expert's statistics divided by its routed-token count —
    every expert then matters equally, whatever its traffic; the mass floor is not applied.
    """
    dn = down_row_norms(down)  # [E, F]
    if weighting == "expert_mean":
        per = 1.0 / np.maximum(stats.tokens.astype(np.float64), 1.0)
        stats = dataclasses.replace(
            stats,
            s_gate=stats.s_gate * per[:, None, None],
            s_up=stats.s_up * per[:, None, None],
            c_down=stats.c_down * per[:, None],
            mass=np.ones_like(stats.mass),
        )
    elif weighting != "token_sum":
        raise ValueError(f"loss weighting {weighting!r}: choose 'token_sum' or 'expert_mean'")
    scale = mass_scale(stats.mass, expert_mass_floor)
    e_count, f = dn.shape
    out = {p: np.empty((e_count, r[p], f), np.float32) for p in PROJECTIONS}
    for e in range(e_count):  # float64 products one expert at a time, stored as float32
        for p, stat in zip(PROJECTIONS, (stats.s_gate, stats.s_up, stats.c_down), strict=True):
            out[p][e] = expert_loss_weights(p, stat[e], dn[e], scale[e])
    return out


def expert_weight_scale(
    mass: np.ndarray, tokens: np.ndarray, expert_mass_floor: float, weighting: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the mass-floor multiplier [E], the expert-mean divisor [E] or None) of `loss_weights`,
    from every expert's routed mass and token count — what a chunk of experts needs of the rest."""
    if weighting == "expert_mean":
        per = 1.0 / np.maximum(np.asarray(tokens).astype(np.float64), 1.0)
        return mass_scale(np.ones_like(mass), expert_mass_floor), per
    if weighting != "token_sum":
        raise ValueError(f"loss weighting {weighting!r}: choose 'token_sum' or 'expert_mean'")
    return mass_scale(mass, expert_mass_floor), None


def down_row_norms(down: np.ndarray) -> np.ndarray:
    """‖down[e][f, :]‖² in float64 ([..., F] of [..., F, D])."""
    return np.sum(np.asarray(down, np.float64) ** 2, axis=-1)


def expert_loss_weights(p: str, stat: np.ndarray, dn: np.ndarray, scale: float) -> np.ndarray:
    """One expert's `loss_weights` of projection `p` (float32 [r, F]) from its statistic (S_gate or
    S_up [F, r], c_down [F]; float64 products, whatever the dtype given) and down-row norms."""
    stat = np.asarray(stat, np.float64)
    if p == "down":
        return (stat[None, :] * scale).astype(np.float32)
    return ((stat.T * dn[None, :]) * scale).astype(np.float32)


def unit_norms(units: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """‖unit‖²_W of one expert's units ([r, F] -> float32 [r]): one program per expert, so that
    a layer streamed in chunks gets the same bits as one computed whole."""
    return np.asarray(weighted_sq_norm(jnp.asarray(units), jnp.asarray(weights)))


def sampled_loss(norms: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """The sampled-mode L(e, k, b) = κ_b · ‖unit‖²_W (float32 product, as float64 [E, r, C])."""
    return (norms[..., None] * np.asarray(kappa).astype(np.float32)).astype(np.float64)


@dataclasses.dataclass
class Coefficients:
    loss: dict[str, np.ndarray]  # per projection [E, r, C]
    cost: np.ndarray  # [C] stored bits of one unit (length F) at each candidate
    candidates: tuple[int, ...]
    mode: str
    kappa: dict[str, np.ndarray] | None = None


def loss_coefficients(
    units: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    candidates: Sequence[int],
    group_size: int,
    mode: str = "exact",
    num_samples: int = 1024,
    seed: int = 0,
    layout: ExpertLayout | None = None,
) -> Coefficients:
    """L(e, k, b) for every unit and candidate bit-width, exact or sampled (κ_b).

    Exact mode runs one expert at a time, sharded over the experts of `layout` (default: one
    device), so the coefficients are bit-identical on every mesh. Sampled mode draws its sample
    across all experts and stays one small unsharded program.
    """
    cands = tuple(int(b) for b in candidates)
    n = next(iter(units.values())).shape[-1]
    loss, kappas = {}, {}
    for name in PROJECTIONS:
        if mode == "exact":
            if layout is None:
                layout = sharded.expert_layout(sharded.single_device_mesh(), units[name].shape[0])
            loss[name] = sharded.unit_errors_sharded(
                layout, units[name], weights[name], cands, group_size
            ).astype(np.float64)
        elif mode == "sampled":
            x, w = jnp.asarray(units[name]), jnp.asarray(weights[name])
            kappa = kappa_estimates(x, cands, group_size, w, num_samples=num_samples, seed=seed)
            kappas[name] = np.asarray(kappa)
            norms = np.stack([unit_norms(units[name][e], weights[name][e]) for e in range(len(x))])
            loss[name] = sampled_loss(norms, kappa)
        else:
            raise ValueError(f"loss coefficient mode {mode!r}: choose 'exact' or 'sampled'")
    cost = np.array([stored_bits(n, b, group_size) for b in cands], np.int64)
    return Coefficients(loss=loss, cost=cost, candidates=cands, mode=mode, kappa=kappas or None)
