"""Shared transformer building blocks: RMSNorm, linear layers, RoPE, GQA attention with a KV cache.

Parameter layout: `Linear.kernel` is [in, out] (x @ kernel), the transpose of a PyTorch
`nn.Linear.weight`; the conversion key maps do the transposes so models never do. Attention runs in
the activation dtype with the softmax in float32, as transformers' eager path does, so fp32 logits
match Hugging Face to ~1e-5.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.models.config import ConfigError, ModelConfig

KVLayerCache = dict[str, jax.Array]  # {"k": [B, S, Hkv, dk], "v": [B, S, Hkv, dv]}


_SHAPES_ONLY = contextvars.ContextVar("bitsmoe_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules whose random params are zeros, for `nnx.eval_shape` (abstract models).

    Why: each `rngs.params()` updates an RNG counter, and flax's update asks the traced counter for
    its sharding, which makes JAX walk the whole trace for an error message it then discards. Over
    the ~1000 params of a 92-layer GLM-4.5 that is quadratic: 17 s to build an abstract model whose
    values are never looked at. Shapes and dtypes are the same either way.
    """
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> jax.Array:
    if _SHAPES_ONLY.get():
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back, then scaled (HF's order, which matters in bf16).

    `offset` 1 (Qwen3-Next): the weight is stored zero-centred and the scale is (1 + weight),
    applied in float32 before the cast back, as transformers does for that family.
    """

    def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out]."""

    def __init__(
        self, din: int, dout: int, *, bias: bool = False, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ):
        self.kernel = nnx.Param(_init(rngs, (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class DenseMLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.gate_proj = Linear(hidden, inter, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(hidden, inter, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(inter, hidden, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------
# RoPE
def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin magnitude factor, as transformers computes them.

    Supports `default`, `linear` and `yarn` (DeepSeek-V2-Lite); anything else is refused rather than
    silently computed differently from the original model.
    """
    dim = config.rope_dim
    base = config.rope_theta
    pos = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv = (1.0 / pos).astype(np.float32)
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv, 1.0
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32), 1.0
    if kind == "yarn":
        orig = int(
            scaling.get("original_max_position_embeddings") or config.max_position_embeddings
        )
        # transformers: no `factor` means max_position_embeddings / original_max_position_embeddings
        factor = (
            float(scaling["factor"])
            if scaling.get("factor") is not None
            else config.max_position_embeddings / orig
        )
        attn = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        if attn is None:
            attn = (
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                if (mscale and mscale_all)
                else get_mscale(factor)
            )
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        inv_interp = 1.0 / (factor * pos)
        inv = inv_interp * (1 - extrap) + inv * extrap
        return inv.astype(np.float32), float(attn)
    if kind == "llama3":
        return _llama3_inv_freq(inv, scaling), 1.0
    raise ConfigError(
        f"rope_scaling.rope_type {kind!r} is not supported (default, linear, yarn and llama3 are)"
    )


def _llama3_inv_freq(inv: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1 / Llama 4 frequency scaling: wavelengths longer than the original context divided
    by `factor`, shorter than `original / high_freq_factor` kept, smoothly blended in between
    (transformers' order of float32 operations)."""
    factor = np.float32(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    out = np.where(wavelen > old / low, inv / factor, inv).astype(np.float32)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    if medium.any():  # empty when low == high (Llama 4 Scout), where the blend divides by zero
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        out = np.where(medium, (1 - smooth) * out / factor + smooth * out, out)
    return out.astype(np.float32)


def rope_cos_sin(
    config: ModelConfig, positions: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rope_dim] for integer positions [B, T] (HF's `cat(freqs, freqs)` layout)."""
    inv, scale = rope_inv_freq(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, d]; cos/sin [B, T, d]."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


# -----------------------------------------------------------------------------------------
# attention
def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array | None,
    window: int | None,
    chunk: int | None = None,
) -> jax.Array:
    """Boolean [B, Tq, Tk]: causal, optionally sliding-window or chunked (Llama 4: keys of the
    query's own block of `chunk` absolute positions), optionally limited to filled cache slots."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if chunk is not None:
        m &= k_pos[:, None, :] // chunk == q_pos[:, :, None] // chunk
    if k_valid is not None:
        m &= k_valid[:, None, :]
    return m


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """q [B,Tq,H,d], k [B,Tk,Hkv,d], v [B,Tk,Hkv,dv], mask [B,Tq,Tk] -> [B,Tq,H,dv]; GQA by grouping
    heads. `sinks` [H] (GPT-OSS): one more logit per head in the softmax, attached to no value, so
    a query can put weight on nothing."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, tq, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k).astype(jnp.float32) * scale
    s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
    if sinks is None:
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    else:
        sink = jnp.broadcast_to(
            sinks.astype(jnp.float32).reshape(1, hkv, g, 1, 1), (*s.shape[:-1], 1)
        )
        p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
        p = p.astype(v.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v)
    return o.reshape(b, tq, h, v.shape[-1])


def update_cache(
    cache: KVLayerCache, k: jax.Array, v: jax.Array, start: jax.Array
) -> tuple[KVLayerCache, jax.Array, jax.Array]:
    """Write k/v at slot `start` (same for the whole batch); return the new cache and full k/v."""
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
    return {"k": ck, "v": cv}, ck, cv


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    cache: KVLayerCache | None,
    scale: float,
    window: int | None,
    sinks: jax.Array | None = None,
    chunk: int | None = None,
) -> tuple[jax.Array, KVLayerCache | None]:
    """Causal attention over the new tokens, or over the KV cache after writing them into it."""
    if cache is None:
        mask = attention_mask(positions, positions, None, window, chunk)
        return dot_product_attention(q, k, v, mask, scale, sinks), None
    start = positions[0, 0]
    cache, k, v = update_cache(cache, k, v, start)
    s = k.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=positions.dtype), (q.shape[0], s))
    valid = k_pos < start + q.shape[1]
    mask = attention_mask(positions, k_pos, valid, window, chunk)
    return dot_product_attention(q, k, v, mask, scale, sinks), cache


def l2_norm(x: jax.Array, eps: float) -> jax.Array:
    """Llama 4's weightless RMS norm of q and k per head (computed in float32)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def temperature_scale(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """Llama 4's query scale on NoPE layers, [B, T]: 1 + attn_scale·log(1 + ⌊(pos+1)/floor⌋),
    growing with the absolute position so long contexts keep attention sharp."""
    p = positions.astype(jnp.float32)
    return jnp.log1p(jnp.floor((p + 1.0) / config.floor_scale)) * config.attn_scale + 1.0


class Attention(nnx.Module):
    """Grouped-query attention with RoPE; optional q/k/v biases (Qwen2-MoE, GLM-4.5, GPT-OSS), q/k
    RMSNorm (Qwen3-MoE, GLM-4.5's use_qk_norm), partial rotary (GLM-4.5), sinks and a window per
    layer (GPT-OSS's alternating sliding and full layers), Llama 4's NoPE layers with tuned
    temperature, chunked attention and weightless q/k norm after RoPE, Qwen3-Next's sigmoid output
    gate."""

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, layer: int = 0
    ):
        c = config
        self.config = c
        self.window = c.window_of(layer)
        self.chunk = c.chunk_of(layer)
        self.use_rope = c.uses_rope(layer)
        hd = c.head_dim
        # Qwen3-Next: q_proj also yields a per-channel output gate (each head's q then gate)
        q_out = c.num_attention_heads * hd * (2 if c.attn_output_gate else 1)
        self.q_proj = Linear(c.hidden_size, q_out, bias=c.attention_bias, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(
            c.hidden_size, c.num_key_value_heads * hd, bias=c.attention_bias, rngs=rngs, dtype=dtype
        )
        self.v_proj = Linear(
            c.hidden_size, c.num_key_value_heads * hd, bias=c.attention_bias, rngs=rngs, dtype=dtype
        )
        # Qwen3-MoE's attention_bias also puts a bias on o_proj (Qwen2-MoE's qkv_bias does not).
        # (GPT-OSS's too.)
        o_bias = c.attention_bias and c.model_type in ("qwen3_moe", "gpt_oss")
        self.o_proj = Linear(
            c.num_attention_heads * hd, c.hidden_size, bias=o_bias, rngs=rngs, dtype=dtype
        )
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps, dtype=dtype, offset=c.norm_offset)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps, dtype=dtype, offset=c.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.sinks = (
            nnx.Param(jnp.zeros((c.num_attention_heads,), dtype)) if c.attention_sinks else None
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> KVLayerCache:
        c = self.config
        shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        cache: KVLayerCache | None,
    ) -> tuple[jax.Array, KVLayerCache | None]:
        c = self.config
        b, t, _ = x.shape
        gate = None
        if c.attn_output_gate:
            qg = self.q_proj(x).reshape(b, t, c.num_attention_heads, 2 * c.head_dim)
            q, gate = qg[..., : c.head_dim], qg[..., c.head_dim :].reshape(b, t, -1)
        else:
            q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        r = cos.shape[-1]
        if not self.use_rope:  # Llama 4 NoPE layer
            if c.attn_temperature_tuning:
                q = (q * temperature_scale(c, positions)[:, :, None, None]).astype(q.dtype)
        elif r == c.head_dim:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # partial rotary (GLM-4.5): the first r dims of each head rotate, the rest pass
            q = jnp.concatenate([apply_rope(q[..., :r], cos, sin), q[..., r:]], axis=-1)
            k = jnp.concatenate([apply_rope(k[..., :r], cos, sin), k[..., r:]], axis=-1)
        if c.qk_l2_norm and self.use_rope:
            q, k = l2_norm(q, c.rms_norm_eps), l2_norm(k, c.rms_norm_eps)
        sinks = None if self.sinks is None else self.sinks[...]
        o, cache = attend(
            q, k, v, positions, cache, c.head_dim**-0.5, self.window, sinks, self.chunk
        )
        o = o.reshape(b, t, -1)
        if gate is not None:
            o = o * jax.nn.sigmoid(gate)
        return self.o_proj(o), cache
