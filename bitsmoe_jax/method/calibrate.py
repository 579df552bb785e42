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
(10⁻⁶ of the mean if none was: the fallback supplies the *shape* of the statistics, while how much
an expert matters is left to the routed mass and `expert_mass_floor`). The report lists them.

Each expert's features and sums run in one jitted per-expert program over its routed tokens (padded
to a common capacity), sharded over the experts of the mesh (`quant/sharded.py`), so the work is
about Σ_e n_e·F·r (not E× that) and the result does not depend on how many devices share it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.sharded import ExpertLayout
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
    layout: ExpertLayout | None = None,
) -> ExpertStats:
    """Statistics for one MoE layer.

    x: MoE-block input [N, D]; router_logits [N, E]; expert_idx / expert_w [N, k] (as the model
    routes, routing weights after renormalisation and scaling); gate / up [E, D, F]; vg / vu [D, r]
    the (dequantized) shared bases of gate and up. `layout`: how experts are sharded over the mesh
    (default: one device); the statistics are bit-identical for every layout (see
    `quant/sharded.py`).
    """
    num_experts = gate.shape[0]
    if layout is None:
        layout = sharded.expert_layout(sharded.single_device_mesh(), num_experts)
    plan = make_routing_plan(expert_idx, expert_w, num_experts)
    sizes = np.asarray(plan.group_sizes)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    gate_np, up_np = np.asarray(gate, np.float32), np.asarray(up, np.float32)
    x_np = np.asarray(x, np.float32)
    s_gate, s_up, c_down, mass = sharded.routed_stats(
        layout,
        x_np,
        np.asarray(plan.token),
        np.asarray(plan.weight, np.float32),
        offs,
        sharded.expert_array(layout, lambda e: gate_np[e], gate_np.shape[1:], np.float32),
        sharded.expert_array(layout, lambda e: up_np[e], up_np.shape[1:], np.float32),
        np.asarray(vg),
        np.asarray(vu),
    )

    starved = [e for e in range(num_experts) if sizes[e] < min_tokens]
    if starved:
        probs = np.asarray(jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1), np.float64)
        topk_sum = np.take_along_axis(probs, np.asarray(expert_idx), axis=1).sum(1)
        routed_mean = mass[mass > 0].mean() if (mass > 0).any() else 1.0
        idx_np = np.asarray(expert_idx)
        as_if = []
        for e in starved:
            # its weight had it been in the top-k: renormalised over the top-k ∪ {e} (a token
            # already routed to e keeps its own weight; its probability must not be counted twice)
            in_topk = (idx_np == e).any(axis=1)
            as_if.append(probs[:, e] / (topk_sum + np.where(in_topk, 0.0, probs[:, e])))
        fg, fu, fd, fmass = sharded.all_token_stats(
            x_np, np.stack(as_if), gate_np[starved], up_np[starved], np.asarray(vg), np.asarray(vu)
        )
        for i, e in enumerate(starved):
            target = mass[e] if mass[e] > 0 else 1e-6 * routed_mean
            scale = target / max(float(fmass[i]), 1e-30)
            s_gate[e] = scale * fg[i]
            s_up[e] = scale * fu[i]
            c_down[e] = scale * fd[i]
            mass[e] = target
    return ExpertStats(
        s_gate=s_gate,
        s_up=s_up,
        c_down=c_down,
        mass=mass,
        tokens=sizes.astype(np.int64),
        starved=starved,
    )
