"""Router, grouped (ragged) SwiGLU experts and the MoE block shared by all families.

Experts run as one grouped product over the (token, expert) assignments sorted by expert
(`grouped_matmul`: `jax.lax.ragged_dot` on GPU/TPU, an exact tiled form on CPU), never as a dense
loop over all experts for every token. The routing plan (`RoutingPlan`) is computed once and reused
by every projection, and by the quantized block. Expert weights are stored [E, D, F] for gate/up and
[E, F, D] for down so that `ragged_dot`'s right-hand side is [groups, K, N] with no transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.models.layers import DenseMLP, Linear, _init


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Token→expert assignments sorted by expert, as `ragged_dot` wants them.

    order:       [N*k] index into the flattened (token, slot) assignments, sorted by expert
    token:       [N*k] the token of each sorted assignment
    weight:      [N*k] the routing weight of each sorted assignment (float32)
    group_sizes: [E]   assignments per expert (int32), sums to N*k
    """

    order: jax.Array
    token: jax.Array
    weight: jax.Array
    group_sizes: jax.Array


def make_routing_plan(expert_idx: jax.Array, weights: jax.Array, num_experts: int) -> RoutingPlan:
    """expert_idx, weights: [N, k] -> the plan (stable sort keeps token order inside each
    expert)."""
    k = expert_idx.shape[-1]
    flat = expert_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return RoutingPlan(
        order=order,
        token=order // k,
        weight=weights.reshape(-1)[order].astype(jnp.float32),
        group_sizes=sizes,
    )


def combine(plan: RoutingPlan, y_sorted: jax.Array, num_tokens: int) -> jax.Array:
    """Scatter-add weighted expert outputs [N*k, D] back to tokens [N, D] (accumulated in
    float32)."""
    y = y_sorted.astype(jnp.float32) * plan.weight[:, None]
    return jnp.zeros((num_tokens, y.shape[-1]), jnp.float32).at[plan.token].add(y)


def route(config: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] (float32) -> (top-k weights [N, k] float32, expert indices [N, k]
    int32).

    softmax → (group-limited) top-k → renormalise if `norm_topk_prob` → × routed_scaling_factor.
    Mixtral always renormalises; DeepSeek-V2 never does (its config flag is ignored, as in HF).
    """
    k = config.num_experts_per_tok
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if config.topk_method == "group_limited_greedy" and config.model_type == "deepseek_v2":
        n, e = probs.shape
        g = config.n_group
        group_scores = probs.reshape(n, g, e // g).max(axis=-1)
        _, group_idx = jax.lax.top_k(group_scores, config.topk_group)
        group_mask = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], group_idx].set(True)
        probs = jnp.where(jnp.repeat(group_mask, e // g, axis=1), probs, 0.0)
    w, idx = jax.lax.top_k(probs, k)
    if config.norm_topk_prob and config.model_type != "deepseek_v2":
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w * config.routed_scaling_factor, idx.astype(jnp.int32)


class Router(nnx.Module):
    """Linear router; kernel [D, E]. Logits are computed in float32 for stable top-k ties."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.kernel = nnx.Param(_init(rngs, (config.hidden_size, config.num_experts), dtype))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, D] -> (logits [N, E], weights [N, k], indices [N, k])."""
        logits = x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
        w, idx = route(self.config, logits)
        return logits, w, idx


def grouped_swiglu(
    xs: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array
) -> jax.Array:
    """Expert SwiGLU over sorted tokens xs [M, D] with weights gate/up [E, D, F], down [E, F, D]."""
    g = grouped_matmul(xs, gate, group_sizes)
    u = grouped_matmul(xs, up, group_sizes)
    h = jax.nn.silu(g) * u
    return grouped_matmul(h, down, group_sizes)


class Experts(nnx.Module):
    """E SwiGLU experts held as stacked tensors: gate/up [E, D, F], down [E, F, D]."""

    def __init__(
        self, num_experts: int, hidden: int, inter: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ):
        self.gate = nnx.Param(_init(rngs, (num_experts, hidden, inter), dtype))
        self.up = nnx.Param(_init(rngs, (num_experts, hidden, inter), dtype))
        self.down = nnx.Param(_init(rngs, (num_experts, inter, hidden), dtype))

    def __call__(self, x: jax.Array, plan: RoutingPlan) -> jax.Array:
        """x [N, D] -> weighted sum of routed expert outputs [N, D] (float32)."""
        xs = x[plan.token]
        y = grouped_swiglu(xs, plan.group_sizes, self.gate[...], self.up[...], self.down[...])
        return combine(plan, y, x.shape[0])


class MoEBlock(nnx.Module):
    """Routed experts plus the family's shared experts.

    Qwen2-MoE: one shared expert scaled by sigmoid(shared_expert_gate · x).
    DeepSeek-V2: `n_shared_experts` fused into one MLP of width n·F, added unscaled.
    The routed-expert part is `self.experts`, which the quantizer swaps for a quantized module with
    the same call signature (x, plan) -> [N, D].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        self.config = c
        self.router = Router(c, rngs=rngs, dtype=dtype)
        self.experts: nnx.Module = Experts(
            c.num_experts, c.hidden_size, c.moe_intermediate_size, rngs=rngs, dtype=dtype
        )
        shared, shared_gate = None, None
        if c.model_type == "qwen2_moe" and c.shared_expert_intermediate_size > 0:
            shared = DenseMLP(
                c.hidden_size, c.shared_expert_intermediate_size, rngs=rngs, dtype=dtype
            )
            shared_gate = Linear(c.hidden_size, 1, rngs=rngs, dtype=dtype)
        elif c.model_type == "deepseek_v2" and c.n_shared_experts > 0:
            shared = DenseMLP(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, rngs=rngs, dtype=dtype
            )
        self.shared_expert = shared
        self.shared_expert_gate = shared_gate

    def plan(self, x2d: jax.Array) -> RoutingPlan:
        _, w, idx = self.router(x2d)
        return make_routing_plan(idx, w, self.config.num_experts)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        y = self.experts(x2d, self.plan(x2d)).astype(x.dtype)
        if self.shared_expert is not None:
            s = self.shared_expert(x2d)
            if self.shared_expert_gate is not None:
                s = jax.nn.sigmoid(self.shared_expert_gate(x2d)) * s
            y = y + s
        return y.reshape(shape)
