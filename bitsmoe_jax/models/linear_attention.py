"""Qwen3-Next's Gated DeltaNet: the linear-attention token mixer of three layers in four.

Per value head, a state S [dk, dv] replaces the KV cache. Each token decays it by exp(g_t), writes
its value by the delta rule (S += k_t ⊗ β_t (v_t − Sᵀk_t): only what S does not already predict
for k_t) and reads it with q_t:

    S_t = exp(g_t) S_{t-1} + k_t ⊗ β_t (v_t − exp(g_t) S_{t-1}ᵀ k_t),   o_t = S_tᵀ q_t

with q, k L2-normalised (q also by 1/√dk), β_t = σ(b_t), g_t = −exp(A_log)·softplus(a_t + dt_bias).
q, k and v first pass a causal depthwise convolution (width `linear_conv_kernel_dim`) and SiLU; the
output is RMS-normalised per head and gated by SiLU(z) (`GatedRMSNorm`), then projected back.

The recurrence runs as a `lax.scan` over time in float32 (the reference's token loop; its chunked
form for prefill is the same sum, reassociated). The layer's cache is the last K−1 convolution
inputs and the state S, so decoding costs O(1) per token whatever the context length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.layers import Linear, _init

LinearCache = dict[str, jax.Array]  # {"conv": [B, K-1, C], "state": [B, Hv, dk, dv] float32}


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum x² + eps) over the last axis (the reference's eps placement)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    state: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, H, dk], v [B, T, H, dv], g, beta [B, T, H] (float32), state [B, H, dk, dv] ->
    (outputs [B, T, H, dv], final state). q and k are normalised here."""
    q = l2_normalize(q) * (q.shape[-1] ** -0.5)
    k = l2_normalize(k)

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B, H, d...]
        s = s * jnp.exp(g_t)[..., None, None]
        mem = jnp.einsum("bhkv,bhk->bhv", s, k_t)
        delta = (v_t - mem) * b_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


class GatedRMSNorm(nnx.Module):
    """RMSNorm of each head's output, scaled, then gated by SiLU(z) (in float32)."""

    def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        y = self.weight[...] * xf.astype(x.dtype)
        return (y * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)


class DepthwiseConv(nnx.Module):
    """Causal depthwise 1-D convolution; `weight` [C, 1, K] as transformers' nn.Conv1d stores it."""

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.weight = nnx.Param(_init(rngs, (channels, 1, width), dtype, std=0.2))

    def __call__(self, x: jax.Array, past: jax.Array) -> jax.Array:
        """x [B, T, C] after the K−1 previous inputs `past` [B, K-1, C] -> [B, T, C]."""
        w = self.weight[...][:, 0, :].astype(x.dtype)  # [C, K]
        width = w.shape[-1]
        xx = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        t = x.shape[1]
        return sum(xx[:, j : j + t, :] * w[:, j] for j in range(width))


class GatedDeltaNet(nnx.Module):
    """The token mixer of Qwen3-Next's linear-attention layers (same call contract as
    `Attention`: (x, positions, cos_sin, cache) -> (y, cache); positions and RoPE are unused)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        self.config = c
        self.hk, self.hv = c.linear_num_key_heads, c.linear_num_value_heads
        self.dk, self.dv = c.linear_key_head_dim, c.linear_value_head_dim
        key_dim, value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * key_dim + value_dim
        d = c.hidden_size
        self.in_proj_qkvz = Linear(d, 2 * key_dim + 2 * value_dim, rngs=rngs, dtype=dtype)
        self.in_proj_ba = Linear(d, 2 * self.hv, rngs=rngs, dtype=dtype)
        self.conv1d = DepthwiseConv(self.conv_dim, c.linear_conv_kernel_dim, rngs=rngs, dtype=dtype)
        self.dt_bias = nnx.Param(jnp.ones((self.hv,), dtype))
        self.A_log = nnx.Param(jnp.log(jnp.linspace(1.0, 16.0, self.hv)).astype(dtype))
        self.norm = GatedRMSNorm(self.dv, c.rms_norm_eps, dtype=dtype)
        self.out_proj = Linear(value_dim, d, rngs=rngs, dtype=dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> LinearCache:
        del max_len  # the state does not grow with the context
        return {
            "conv": jnp.zeros(
                (batch, self.config.linear_conv_kernel_dim - 1, self.conv_dim), dtype
            ),
            "state": jnp.zeros((batch, self.hv, self.dk, self.dv), jnp.float32),
        }

    def _split(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The projections in transformers' grouped order: per key head, its q, k, then the
        values and gates of its hv/hk value heads; b and a alike."""
        b, t, _ = x.shape
        r = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).reshape(b, t, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k = qkvz[..., : self.dk], qkvz[..., self.dk : 2 * self.dk]
        v = qkvz[..., 2 * self.dk : 2 * self.dk + r * self.dv].reshape(b, t, self.hv, self.dv)
        z = qkvz[..., 2 * self.dk + r * self.dv :].reshape(b, t, self.hv, self.dv)
        ba = self.in_proj_ba(x).reshape(b, t, self.hk, 2 * r)
        return q, k, v, z, ba[..., :r].reshape(b, t, self.hv), ba[..., r:].reshape(b, t, self.hv)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        cache: LinearCache | None,
    ) -> tuple[jax.Array, LinearCache | None]:
        del positions, cos_sin
        bsz, t, _ = x.shape
        q, k, v, z, b, a = self._split(x)
        mixed = jnp.concatenate(
            [q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)], axis=-1
        )
        width = self.config.linear_conv_kernel_dim
        past = (
            jnp.zeros((bsz, width - 1, self.conv_dim), x.dtype) if cache is None else cache["conv"]
        )
        conv = jax.nn.silu(self.conv1d(mixed, past))
        key_dim = self.hk * self.dk
        r = self.hv // self.hk
        q = jnp.repeat(conv[..., :key_dim].reshape(bsz, t, self.hk, self.dk), r, axis=2)
        k = jnp.repeat(
            conv[..., key_dim : 2 * key_dim].reshape(bsz, t, self.hk, self.dk), r, axis=2
        )
        v = conv[..., 2 * key_dim :].reshape(bsz, t, self.hv, self.dv)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        )
        state = (
            jnp.zeros((bsz, self.hv, self.dk, self.dv), jnp.float32)
            if cache is None
            else cache["state"]
        )
        f32 = jnp.float32
        o, state = gated_delta_rule(q.astype(f32), k.astype(f32), v.astype(f32), g, beta, state)
        o = self.norm(o.astype(x.dtype), z)
        y = self.out_proj(o.reshape(bsz, t, -1))
        if cache is None:
            return y, None
        xx = jnp.concatenate([past.astype(x.dtype), mixed], axis=1)
        return y, {"conv": xx[:, xx.shape[1] - (width - 1) :].astype(past.dtype), "state": state}
