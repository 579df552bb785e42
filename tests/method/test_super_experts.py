"""Super experts: kept at high precision, found automatically from output outliers, counted in the
budget."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.method.layer_problem import detect_super_experts, solve_units
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock


def _config() -> ModelConfig:
    return ModelConfig(
        model_type="mixtral",
        vocab_size=128,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=24,
        moe_intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=2,
    )


def test_auto_detection_finds_the_outlier_expert():
    block = MoEBlock(_config(), rngs=nnx.Rngs(0))
    block.router.kernel[...] = jnp.zeros_like(
        block.router.kernel[...]
    )  # uniform routing: every expert sees tokens
    block.router.kernel[...] = block.router.kernel[...] + 1e-3 * jnp.asarray(
        np.random.default_rng(0).normal(size=(16, 6)), jnp.float32
    )
    down = np.asarray(block.experts.down[...]).copy()
    down[4] *= 200.0  # expert 4 produces extreme activations
    block.experts.down[...] = jnp.asarray(down)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(400, 16)), jnp.float32)
    assert detect_super_experts(x, block, threshold=8.0) == [4]


def test_fixed_units_get_super_bits_and_their_cost_counts():
    rng = np.random.default_rng(0)
    cands = (0, 2, 4, 8)
    cost = np.tile(np.array([0.0, 2.0, 4.0, 8.0]), (10, 1))
    loss = np.sort(rng.random((10, 4)), axis=1)[:, ::-1].copy()
    fixed = np.zeros(10, bool)
    fixed[:3] = True
    bits, alloc = solve_units(loss, cost, fixed, cands, 8, budget=40.0, allocator="milp")
    assert (bits[:3] == 8).all()
    free_cost = sum(cost[i, cands.index(b)] for i, b in enumerate(bits) if i >= 3)
    assert free_cost <= 40.0 - 24.0 + 1e-9  # the super units' 24 bits come out of the same budget
    assert alloc.total_cost == free_cost
