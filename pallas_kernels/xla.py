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
from bitsmoe_jax.models.moe import SWIGLU, GluActivation
from pallas_kernels.routing import expert_of_rows


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
    act: GluActivation = SWIGLU,
    gate_bias: jax.Array | None = None,
    up_bias: jax.Array | None = None,
) -> jax.Array:
    """``acc [M, r_d]`` in the activation dtype from dense factors ``[E, r, F]`` in that dtype:
    three grouped matmuls, the SiLU gating (or GPT-OSS's ``act``, after its ``[E, F]`` biases)
    between them."""
    g = grouped_matmul(zg, ag, group_sizes)
    u = grouped_matmul(zu, au, group_sizes)
    if gate_bias is not None or up_bias is not None:
        e = expert_of_rows(group_sizes, zg.shape[0])
        g = g if gate_bias is None else g + gate_bias.astype(g.dtype)[e]
        u = u if up_bias is None else u + up_bias.astype(u.dtype)[e]
    h = act(g, u)
    return grouped_matmul(h, jnp.swapaxes(bd, 1, 2), group_sizes)
