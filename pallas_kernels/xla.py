"""The routed-expert product on any platform without a kernel (backend ``"xla"``): the stored packed
factors dequantized inside the jitted computation, then XLA's grouped matmul.

`PackedFactors` is this backend's (and ``"reference"``'s) layout: the stored `PackedMatrix` of one
projection as is, with its expert count, so nothing is derived at load time.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bitsmoe_jax.method.packing import PackedMatrix, dequantize_packed
from bitsmoe_jax.models.grouped_matmul import grouped_matmul


@dataclasses.dataclass(frozen=True)
class PackedFactors:
    """One projection's stored factors (all ``E·r`` units) for the ``"xla"`` and ``"reference"``
    backends."""

    packed: PackedMatrix
    num_experts: int

    @property
    def r(self) -> int:
        """Components per expert."""
        return self.packed.num_units // self.num_experts

    @property
    def n(self) -> int:
        return int(self.packed.n)

    def dense(self) -> jax.Array:
        """Dequantized factors ``[E, r, n]`` float32."""
        flat = dequantize_packed(self.packed)
        return flat.reshape(self.num_experts, -1, flat.shape[-1])

    def bytes_read(self) -> dict[str, int]:
        return {"packed": self.packed.stored_bits() // 8}


jax.tree_util.register_dataclass(PackedFactors, data_fields=["packed"], meta_fields=["num_experts"])


def swiglu_experts_xla(
    zg: jax.Array,
    zu: jax.Array,
    group_sizes: jax.Array,
    ag: jax.Array,
    au: jax.Array,
    bd: jax.Array,
) -> jax.Array:
    """``acc [M, r_d]`` in the activation dtype from dense factors ``[E, r, F]`` in that dtype:
    three grouped matmuls, the SiLU gating between them."""
    g = grouped_matmul(zg, ag, group_sizes)
    u = grouped_matmul(zu, au, group_sizes)
    h = jax.nn.silu(g) * u
    return grouped_matmul(h, jnp.swapaxes(bd, 1, 2), group_sizes)
