"""Backend ``"reference"``: the routed-expert computation the kernels perform, in pure jnp.

Works on the *dequantized* factors in original component order (``packing.dequantize_packed``), so
it shares nothing with the kernel layout: a per-row gather of each row's expert factors and two
einsums. Quadratic in memory (``M·r·F``) — for tests and small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitsmoe_jax.models.moe import SWIGLU, GluActivation
from pallas_kernels.routing import expert_of_rows


def swiglu_experts_reference(
    zg: jax.Array,
    zu: jax.Array,
    group_sizes: jax.Array,
    ag: jax.Array,
    au: jax.Array,
    bd: jax.Array,
    act: GluActivation = SWIGLU,
    gate_bias: jax.Array | None = None,
    up_bias: jax.Array | None = None,
) -> jax.Array:
    """Rows sorted by expert: ``zg [M, r_g]``, ``zu [M, r_u]``; factors ``ag [E, r_g, F]``,
    ``au [E, r_u, F]``, ``bd [E, r_d, F]`` -> ``acc [M, r_d]`` float32 with
    ``acc[m] = Bd[e]·(silu(zg[m]·Ag[e]) ⊙ (zu[m]·Au[e]))``, ``e`` the expert of row ``m``; or
    GPT-OSS's ``act`` (clamped) of ``zg[m]·Ag[e] + gate_bias[e]`` and ``zu[m]·Au[e] + up_bias[e]``
    (biases ``[E, F]``)."""
    e = expert_of_rows(group_sizes, zg.shape[0])
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    g = jnp.einsum("mr,mrf->mf", zg.astype(f32), ag.astype(f32)[e], precision=hi)
    u = jnp.einsum("mr,mrf->mf", zu.astype(f32), au.astype(f32)[e], precision=hi)
    if gate_bias is not None:
        g = g + gate_bias.astype(f32)[e]
    if up_bias is not None:
        u = u + up_bias.astype(f32)[e]
    h = act(g, u)
    return jnp.einsum("mf,mcf->mc", h, bd.astype(f32)[e], precision=hi)
