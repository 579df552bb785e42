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
import numpy as np
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


def route(
    config: ModelConfig, logits: jax.Array, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Router logits [N, E] (float32) -> (top-k weights [N, k] float32, expert indices [N, k]
    int32).

    softmax → (group-limited) top-k → renormalise if `norm_topk_prob` → × routed_scaling_factor.
    Mixtral always renormalises; DeepSeek-V2 never does (its config flag is ignored, as in HF).
    Sigmoid routing (DeepSeek-V3, Kimi-K2, GLM-4.5, "noaux_tc"): `sigmoid_route`. Llama 4:
    sigmoid of the top-k logits (they scale the experts' inputs, `MoEBlock.expert_inputs`).
    """
    if config.router_scales_input:  # Llama 4: top-k logits, each squashed by a sigmoid
        top, idx = jax.lax.top_k(logits.astype(jnp.float32), config.num_experts_per_tok)
        return jax.nn.sigmoid(top), idx.astype(jnp.int32)
    if config.router_scoring == "sigmoid":
        if bias is None:
            raise ValueError("sigmoid routing needs the router's e_score_correction_bias")
        return sigmoid_route(config, logits, bias)
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


def sigmoid_route(
    config: ModelConfig, logits: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3's router: experts are *chosen* by sigmoid score + a learned per-expert bias
    (load balancing without an auxiliary loss), but *weighted* by the unbiased sigmoid score.

    Choice is group-limited: each of `n_group` groups is scored by the sum of its two best biased
    scores, the best `topk_group` groups are kept, and the top-k experts are taken from those.
    Then weights are renormalised (`norm_topk_prob`, +1e-20 as transformers) and scaled by
    `routed_scaling_factor`. The bias only moves the choice, so it must stay exact (float32).
    """
    k = config.num_experts_per_tok
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    n, e = choice.shape
    g = config.n_group
    if config.topk_group < g:
        top2, _ = jax.lax.top_k(choice.reshape(n, g, e // g), 2)
        _, group_idx = jax.lax.top_k(top2.sum(axis=-1), config.topk_group)
        group_mask = jnp.zeros((n, g), bool).at[jnp.arange(n)[:, None], group_idx].set(True)
        choice = jnp.where(jnp.repeat(group_mask, e // g, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if config.norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * config.routed_scaling_factor, idx.astype(jnp.int32)


class Router(nnx.Module):
    """Linear router; kernel [D, E]. Logits are computed in float32 for stable top-k ties.

    Sigmoid routers (DeepSeek-V3, GLM-4.5) also hold `e_score_correction_bias` [E], always float32
    (transformers keeps it so: it decides the top-k among near-equal scores).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.kernel = nnx.Param(_init(rngs, (config.hidden_size, config.num_experts), dtype))
        self.e_score_correction_bias = (
            nnx.Param(jnp.zeros((config.num_experts,), jnp.float32))
            if config.router_scoring == "sigmoid"
            else None
        )
        # GPT-OSS: logits = x·W + b
        self.bias = (
            nnx.Param(jnp.zeros((config.num_experts,), dtype)) if config.router_bias else None
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, D] -> (logits [N, E], weights [N, k], indices [N, k])."""
        logits = x.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(jnp.float32)
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
        w, idx = route(self.config, logits, bias)
        return logits, w, idx


@dataclasses.dataclass(frozen=True)
class GluActivation:
    """The experts' gated activation h = act(g, u) of the gate and up projections.

    limit = 0: SwiGLU, silu(g)·u (every family but GPT-OSS). limit > 0: GPT-OSS's clamped form,
    g' = min(g, limit), u' = clip(u, ±limit), h = (u' + 1)·g'·σ(α·g').
    """

    limit: float = 0.0
    alpha: float = 1.0

    def __call__(self, g: jax.Array, u: jax.Array) -> jax.Array:
        if not self.limit:
            return jax.nn.silu(g) * u
        g = jnp.minimum(g, self.limit)
        u = jnp.clip(u, -self.limit, self.limit)
        return (u + 1) * (g * jax.nn.sigmoid(g * self.alpha))

    def with_grads(self, g: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(h, ∂h/∂g, ∂h/∂u) elementwise: what the activation-aware loss weights need (the
        clamped form's derivatives are 0 where the clamp holds)."""
        if not self.limit:
            sig = jax.nn.sigmoid(g)
            silu = g * sig
            return silu * u, sig * (1 + g * (1 - sig)) * u, silu
        gc = jnp.minimum(g, self.limit)
        uc = jnp.clip(u, -self.limit, self.limit)
        sig = jax.nn.sigmoid(gc * self.alpha)
        glu = gc * sig
        dglu = sig * (1 + self.alpha * gc * (1 - sig))
        dh_dg = jnp.where(g < self.limit, (uc + 1) * dglu, 0.0)
        dh_du = jnp.where(jnp.abs(u) < self.limit, glu, 0.0)
        return (uc + 1) * glu, dh_dg, dh_du


SWIGLU = GluActivation()


def expert_activation(config: ModelConfig) -> GluActivation:
    return (
        GluActivation(config.swiglu_limit, config.swiglu_alpha) if config.swiglu_limit else SWIGLU
    )


@dataclasses.dataclass(frozen=True, eq=False)
class ExpertFn:
    """What a layer's experts do besides their three matrices: the gated activation and (GPT-OSS)
    biases gate/up [E, F], down [E, D] (float32 numpy). `plain`: bias-free SwiGLU, every family
    but GPT-OSS — the code paths built for it run unchanged."""

    act: GluActivation = SWIGLU
    bias: dict[str, np.ndarray] | None = None

    @property
    def plain(self) -> bool:
        return self.act == SWIGLU and self.bias is None

    @classmethod
    def of(cls, act: GluActivation, bias: dict[str, Any] | None) -> ExpertFn:
        """From an activation and (GPT-OSS) bias arrays of any array type: `PLAIN` when there is
        nothing besides SwiGLU, else the biases as float32 numpy."""
        if bias is None and act == SWIGLU:
            return PLAIN
        return cls(
            act, None if bias is None else {k: np.asarray(v, np.float32) for k, v in bias.items()}
        )

    def rows(self, which: str, experts: np.ndarray) -> np.ndarray | None:
        """The bias `which` of each row's expert (None without biases)."""
        return None if self.bias is None else self.bias[which][experts]


PLAIN = ExpertFn()


def block_expert_fn(block: MoEBlock) -> ExpertFn:
    """The `ExpertFn` of an MoE block (its config's activation, its bias parameters)."""
    return ExpertFn.of(block.act, None if block.expert_bias is None else block.expert_bias.arrays())


def down_bias_term(plan: RoutingPlan, down_bias: jax.Array, num_tokens: int) -> jax.Array:
    """Σ over a token's routed experts of weight · down bias [N, D] float32 (added after
    `combine`, so that rank-space accumulations (quantized experts) can take it too)."""
    rows = expert_of_rows(plan.group_sizes, plan.token.shape[0])
    return combine(plan, jnp.asarray(down_bias)[rows].astype(jnp.float32), num_tokens)


def expert_of_rows(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[M] the expert of each row of a group-sorted [M, ...] array."""
    e = group_sizes.shape[0]
    return jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=num_rows)


def grouped_swiglu(
    xs: jax.Array,
    group_sizes: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    act: GluActivation = SWIGLU,
    bias: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """Expert SwiGLU over sorted tokens xs [M, D] with weights gate/up [E, D, F], down [E, F, D]
    (and GPT-OSS's gate/up biases [E, F], added per row's expert, and its activation)."""
    g = grouped_matmul(xs, gate, group_sizes)
    u = grouped_matmul(xs, up, group_sizes)
    if bias is not None:  # gate/up only: the down bias is added per token (`down_bias_term`)
        rows = expert_of_rows(group_sizes, xs.shape[0])
        g = g + jnp.asarray(bias["gate"])[rows].astype(g.dtype)
        u = u + jnp.asarray(bias["up"])[rows].astype(u.dtype)
    return grouped_matmul(act(g, u), down, group_sizes)


class ExpertBias(nnx.Module):
    """GPT-OSS's expert biases, gate/up [E, F] and down [E, D]: kept beside the experts (not in
    them) so that the quantizer, which replaces `mlp.experts`, keeps them exact."""

    def __init__(self, num_experts: int, hidden: int, inter: int, *, dtype: Any = jnp.float32):
        self.gate = nnx.Param(jnp.zeros((num_experts, inter), dtype))
        self.up = nnx.Param(jnp.zeros((num_experts, inter), dtype))
        self.down = nnx.Param(jnp.zeros((num_experts, hidden), dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {"gate": self.gate[...], "up": self.up[...], "down": self.down[...]}


class Experts(nnx.Module):
    """E SwiGLU experts held as stacked tensors: gate/up [E, D, F], down [E, F, D]."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        self.gate = nnx.Param(_init(rngs, (num_experts, hidden, inter), dtype))
        self.up = nnx.Param(_init(rngs, (num_experts, hidden, inter), dtype))
        self.down = nnx.Param(_init(rngs, (num_experts, inter, hidden), dtype))

    def __call__(
        self,
        x: jax.Array,
        plan: RoutingPlan,
        bias: dict[str, jax.Array] | None = None,
        act: GluActivation = SWIGLU,
    ) -> jax.Array:
        """x [N, D] -> weighted sum of routed expert outputs [N, D] (float32). Every routed-expert
        module (quantized, streamed) takes the same call; `bias` and `act` only for GPT-OSS."""
        xs = x[plan.token]
        y = grouped_swiglu(
            xs, plan.group_sizes, self.gate[...], self.up[...], self.down[...], act, bias
        )
        out = combine(plan, y, x.shape[0])
        if bias is not None:
            out = out + down_bias_term(plan, bias["down"], x.shape[0])
        return out


class MoEBlock(nnx.Module):
    """Routed experts plus the family's shared experts.

    Qwen2-MoE, Qwen3-Next: one shared expert scaled by sigmoid(shared_expert_gate · x).
    DeepSeek-V2/V3, GLM-4.5: `n_shared_experts` fused into one MLP of width n·F, added unscaled.
    Llama 4: one shared expert of width F, added unscaled.
    The routed-expert part is `self.experts`, which the quantizer swaps for a quantized module with
    the same call signature (x, plan) -> [N, D].
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        self.config = c
        self.router = Router(c, rngs=rngs, dtype=dtype)
        self.experts: nnx.Module = Experts(
            c.num_experts,
            c.hidden_size,
            c.moe_intermediate_size,
            rngs=rngs,
            dtype=dtype,
        )
        self.act = expert_activation(c)
        self.expert_bias = (
            ExpertBias(c.num_experts, c.hidden_size, c.moe_intermediate_size, dtype=dtype)
            if c.expert_bias
            else None
        )
        shared, shared_gate = None, None
        if c.model_type in ("qwen2_moe", "qwen3_next") and c.shared_expert_intermediate_size > 0:
            shared = DenseMLP(
                c.hidden_size, c.shared_expert_intermediate_size, rngs=rngs, dtype=dtype
            )
            shared_gate = Linear(c.hidden_size, 1, rngs=rngs, dtype=dtype)
        elif c.model_type in ("deepseek_v2", "deepseek_v3", "glm4_moe") and c.n_shared_experts:
            shared = DenseMLP(
                c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, rngs=rngs, dtype=dtype
            )
        elif c.model_type == "llama4_text":  # one shared expert of the routed experts' width
            shared = DenseMLP(c.hidden_size, c.moe_intermediate_size, rngs=rngs, dtype=dtype)
        self.shared_expert = shared
        self.shared_expert_gate = shared_gate

    def route_tokens(self, x2d: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(the routed experts' input [N, D], router logits [N, E], combine weights [N, k],
        expert indices [N, k]).

        Every family but Llama 4 weights the experts' outputs: the input is x and the weights are
        the router's. Llama 4 scales the input instead — expert(score · x), summed unweighted —
        which for its top-1 routing is a per-token scaling of x with weight 1. Quantization
        calibrates on exactly these inputs and weights, so the statistics see what the experts do.
        """
        logits, w, idx = self.router(x2d)
        if self.config.router_scales_input:
            return (x2d * w.astype(x2d.dtype)).astype(x2d.dtype), logits, jnp.ones_like(w), idx
        return x2d, logits, w, idx

    def plan(self, x2d: jax.Array) -> RoutingPlan:
        """The routing plan alone (the experts' input is x2d itself but for Llama 4: see
        `expert_inputs`)."""
        return self.expert_inputs(x2d)[1]

    def expert_inputs(self, x2d: jax.Array) -> tuple[jax.Array, RoutingPlan]:
        """(the routed experts' input, the routing plan) of MoE input rows x2d [N, D]."""
        x_in, _, w, idx = self.route_tokens(x2d)
        return x_in, make_routing_plan(idx, w, self.config.num_experts)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        x_in, plan = self.expert_inputs(x2d)
        if self.expert_bias is None and self.act == SWIGLU:
            y = self.experts(x_in, plan)
        else:
            bias = None if self.expert_bias is None else self.expert_bias.arrays()
            y = self.experts(x_in, plan, bias=bias, act=self.act)
        y = y.astype(x.dtype)
        if self.shared_expert is not None:
            s = self.shared_expert(x2d)
            if self.shared_expert_gate is not None:
                s = jax.nn.sigmoid(self.shared_expert_gate(x2d)) * s
            y = y + s
        return y.reshape(shape)
