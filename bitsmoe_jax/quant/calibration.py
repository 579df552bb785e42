"""Calibration statistics for one MoE layer: what the loss surrogate needs, per expert.

For every (token, expert) assignment routed by the layer's own router we need, in the spectral
coordinates of the shared bases (z = Vᵀx):

- gate units (e, k):  S_gate[e][f, k] = Σ_t w_te² · (∂h_f/∂g_f)² · z_g,tk²
- up units (e, k):    S_up[e][f, k]   = Σ_t w_te² · (∂h_f/∂u_f)² · z_u,tk²
- down units (e, k):  c_down[e][f]    = Σ_t w_te² · h_tf²      (the same for every component k)

with h = silu(g) ⊙ u, ∂h/∂g = silu'(g)·u, ∂h/∂u = silu(g). Sums run over tokens (not means per
expert) so that an expert's routing frequency is part of the objective; `mass[e] = Σ_t w_te²` is
kept separately so the coefficient stage can apply `expert_mass_floor`.

Starved experts (fewer than `min_tokens` routed tokens) are never skipped and never give NaN: their
statistics are computed over *every* calibration token of the layer as if routed, with the weight
each token would have had (its softmax router probability for that expert, renormalised over the
expert and the token's top-k), then scaled so their mass equals the mass actually routed to them
(10⁻⁶ of the mean if none was: the fallback supplies the *shape* of the statistics, while how much an
expert matters is left to the routed mass and `expert_mass_floor`). The report lists them.

Per-assignment features are computed with jitted JAX; the per-expert reductions run on the host over
contiguous slices of the expert-sorted assignments, so the work is Σ_e n_e·F·r (not E× that).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.models.moe import make_routing_plan


@dataclasses.dataclass
class ExpertStats:
    """Per-expert calibration statistics of one MoE layer (numpy, float64 for safe accumulation)."""

    s_gate: np.ndarray  # [E, F, r_g]
    s_up: np.ndarray  # [E, F, r_u]
    c_down: np.ndarray  # [E, F]
    mass: np.ndarray  # [E]  Σ_t w_te² over routed tokens (after the starved fallback's rescale)
    tokens: np.ndarray  # [E]  routed assignments (before any fallback)
    starved: list[int]  # experts that used the fallback


@jax.jit
def _features(xs, w, gate, up, vg, vu, group_sizes):
    """Per-assignment (sorted by expert) squared sensitivities and spectral coordinates."""
    g = grouped_matmul(xs, gate, group_sizes).astype(jnp.float32)
    u = grouped_matmul(xs, up, group_sizes).astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dsilu = sig * (1 + g * (1 - sig))
    w2 = (w.astype(jnp.float32) ** 2)[:, None]
    a_gate = w2 * (dsilu * u) ** 2
    a_up = w2 * silu**2
    a_down = w2 * (silu * u) ** 2
    zg2 = (xs.astype(jnp.float32) @ vg.astype(jnp.float32)) ** 2
    zu2 = (xs.astype(jnp.float32) @ vu.astype(jnp.float32)) ** 2
    return a_gate, a_up, a_down, zg2, zu2


def _expert_features(x, w, e, gate, up, vg, vu):
    """Features for all rows of x against the single expert e (used by the starved fallback)."""
    sizes = jnp.zeros((gate.shape[0],), jnp.int32).at[e].set(x.shape[0])
    return _features(x, w, gate, up, vg, vu, sizes)


def collect_expert_stats(
    x: jax.Array,
    router_logits: jax.Array,
    expert_idx: jax.Array,
    expert_w: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    vg: jax.Array,
    vu: jax.Array,
    min_tokens: int = 16,
) -> ExpertStats:
    """Statistics for one MoE layer.

    x: MoE-block input [N, D]; router_logits [N, E]; expert_idx / expert_w [N, k] (as the model routes,
    routing weights after renormalisation and scaling); gate / up [E, D, F]; vg / vu [D, r] the (dequantized)
    shared bases of gate and up.
    """
    n, _ = x.shape
    num_experts = gate.shape[0]
    plan = make_routing_plan(expert_idx, expert_w, num_experts)
    xs = x[plan.token]
    feats = [np.asarray(a, np.float64) for a in _features(xs, plan.weight, gate, up, vg, vu, plan.group_sizes)]
    a_gate, a_up, a_down, zg2, zu2 = feats
    sizes = np.asarray(plan.group_sizes)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    f = gate.shape[-1]
    s_gate = np.zeros((num_experts, f, vg.shape[1]))
    s_up = np.zeros((num_experts, f, vu.shape[1]))
    c_down = np.zeros((num_experts, f))
    mass = np.zeros(num_experts)
    wsorted = np.asarray(plan.weight, np.float64)
    for e in range(num_experts):
        sl = slice(offs[e], offs[e + 1])
        s_gate[e] = a_gate[sl].T @ zg2[sl]
        s_up[e] = a_up[sl].T @ zu2[sl]
        c_down[e] = a_down[sl].sum(0)
        mass[e] = np.sum(wsorted[sl] ** 2)

    starved = [e for e in range(num_experts) if sizes[e] < min_tokens]
    if starved:
        probs = np.asarray(jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1), np.float64)
        topk_sum = np.take_along_axis(probs, np.asarray(expert_idx), axis=1).sum(1)
        routed_mean = mass[mass > 0].mean() if (mass > 0).any() else 1.0
        idx_np = np.asarray(expert_idx)
        for e in starved:
            # its weight had it been in the top-k: renormalised over the top-k ∪ {e} (a token already
            # routed to e keeps its own weight; its probability must not be counted twice)
            in_topk = (idx_np == e).any(axis=1)
            w_as_if = probs[:, e] / (topk_sum + np.where(in_topk, 0.0, probs[:, e]))
            ag, au, ad, g2, u2 = (np.asarray(a, np.float64) for a in _expert_features(x, jnp.asarray(w_as_if, jnp.float32), e, gate, up, vg, vu))
            fallback_mass = np.sum(w_as_if**2)
            target = mass[e] if mass[e] > 0 else 1e-6 * routed_mean
            scale = target / max(fallback_mass, 1e-30)
            s_gate[e] = scale * (ag.T @ g2)
            s_up[e] = scale * (au.T @ u2)
            c_down[e] = scale * ad.sum(0)
            mass[e] = target
    return ExpertStats(s_gate=s_gate, s_up=s_up, c_down=c_down, mass=mass, tokens=sizes.astype(np.int64), starved=starved)
