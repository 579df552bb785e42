"""Backend ``"reference"``: the routed-expert computation the kernels perform, in pure jnp.

Works on the *dequantized* factors in original component order (``packing.dequantize_packed``), so
it shares nothing with the kernel layout: a per-row gather of each row's expert factors and two
einsums. Quadratic in memory (``M·r·F``) — for tests and small shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.routing import expert_of_rows


def swiglu_experts_reference(
    zg: jax.Array,
    zu: jax.Array,
    group_sizes: jax.Array,
    ag: jax.Array,
    au: jax.Array,
    bd: jax.Array,
) -> jax.Array:
    """Rows sorted by expert: ``zg [M, r_g]``, ``zu [M, r_u]``; factors ``ag [E, r_g, F]``,
    ``au [E, r_u, F]``, ``bd [E, r_d, F]`` -> ``acc [M, r_d]`` float32 with
    ``acc[m] = Bd[e]·(silu(zg[m]·Ag[e]) ⊙ (zu[m]·Au[e]))``, ``e`` the expert of row ``m``."""
    e = expert_of_rows(group_sizes, zg.shape[0])
    hi = jax.lax.Precision.HIGHEST
    f32 = jnp.float32
    g = jnp.einsum("mr,mrf->mf", zg.astype(f32), ag.astype(f32)[e], precision=hi)
    u = jnp.einsum("mr,mrf->mf", zu.astype(f32), au.astype(f32)[e], precision=hi)
    h = jax.nn.silu(g) * u
    return jnp.einsum("mf,mcf->mc", h, bd.astype(f32)[e], precision=hi)
