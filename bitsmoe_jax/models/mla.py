"""Multi-head latent attention (MLA), DeepSeek-V2/V3's attention, with the same contract as
`layers.Attention`.

Per token x [D]:

    q        = q_proj(x)                                      (V2-Lite: q_lora_rank is None)
             | q_b_proj(q_a_layernorm(q_a_proj(x)))           (V2: low-rank query)
    q        -> per head [q_nope (qk_nope_head_dim) | q_pe (qk_rope_head_dim)]
    c, k_pe  = kv_a_proj_with_mqa(x) split [kv_lora_rank | qk_rope_head_dim]
    kv       = kv_b_proj(kv_a_layernorm(c)) -> per head [k_nope | v (v_head_dim)]
    q_pe, k_pe rotated by RoPE; k_pe is one key shared by every head (hence "with_mqa")
    k        = [k_nope | k_pe] (qk_head_dim = nope + rope), attention over heads, o_proj

RoPE is applied as transformers' DeepSeek-V2 does it: to *interleaved* pairs (x[2i], x[2i+1]) seen
as complex numbers multiplied by `attention_scaling · e^{i·pos·inv_freq_i}`, not with `rotate_half`
on the two halves. DeepSeek-V3's transformers code returns the rotated pairs de-interleaved
(evens then odds) for q and k alike, which permutes both the same way and leaves every q·k
unchanged; `rope_interleave: false` in a V3 config means `rotate_half`. The cos/sin handed in
are `layers.rope_cos_sin`'s (`cat(freqs, freqs)` layout, already times YaRN's attention factor),
so their first half holds the per-pair values. Only the rope parts rotate.

Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)² when the rope scaling is not
the default one and names a non-zero `mscale_all_dim` (DeepSeek's YaRN checkpoints; exactly
transformers' `yarn_apply_mscale`). `q_a_layernorm` and `kv_a_layernorm` use eps 1e-6 whatever
`rms_norm_eps` says, as transformers and the original DeepSeek code build them with the default.

Submodules carry transformers' names (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`), so the generic conversion rule
(`X.weight` [out, in] <-> our `X.kernel` [in, out], biases and norm weights by name) covers them
all. Biases follow `attention_bias` where transformers puts them: q_a_proj, kv_a_proj_with_mqa and
o_proj.

KV cache: per-head keys [B, S, H, qk_head_dim] and values [B, S, H, v_head_dim], i.e. the
decompressed form, so decoding reuses `layers.attend` unchanged. Caching the compressed latent
instead (kv_lora_rank + qk_rope_head_dim values per token, 576 against H·(192+128) = 5120 for
V2-Lite) and re-expanding it with kv_b_proj at each step — or absorbing kv_b_proj into q and o_proj
— would be a ~9x memory saving for long contexts; it is not needed for quantization or evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitsmoe_jax.models.config import ModelConfig, yarn_get_mscale
from bitsmoe_jax.models.layers import KVLayerCache, Linear, RMSNorm, apply_rope, attend

MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers' DeepseekV2RMSNorm default


def mla_softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)² for DeepSeek's YaRN (transformers'
    rule)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling_dict
    if scaling and scaling.get("rope_type", "default") != "default":
        mscale_all_dim = scaling.get("mscale_all_dim") or 0
        if mscale_all_dim:
            factor = scaling.get("factor")
            if (
                factor is None
            ):  # as rope_inv_freq: max_position_embeddings / original_max_position_embeddings
                orig = (
                    scaling.get("original_max_position_embeddings")
                    or config.max_position_embeddings
                )
                factor = config.max_position_embeddings / orig
            m = yarn_get_mscale(float(factor), float(mscale_all_dim))
            scale = scale * m * m
    return scale


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) by angle i, computed in float32.

    x [B, T, H, d]; cos/sin [B, T, d] in `cat(freqs, freqs)` layout (only the first d/2 are used).
    Equals transformers' `view_as_complex(x) * freqs_cis` for DeepSeek-V2.
    """
    b, t, h, d = x.shape
    half = d // 2
    c = cos[..., :half].astype(jnp.float32)[:, :, None, :]
    s = sin[..., :half].astype(jnp.float32)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(b, t, h, half, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(b, t, h, d).astype(x.dtype)


class MLAAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention; call contract identical to `layers.Attention`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        if (
            c.kv_lora_rank <= 0
            or c.qk_rope_head_dim <= 0
            or c.v_head_dim <= 0
            or c.qk_rope_head_dim % 2
        ):
            raise ValueError(
                "MLA needs kv_lora_rank > 0, v_head_dim > 0 and an even qk_rope_head_dim > 0; got "
                f"kv_lora_rank={c.kv_lora_rank}, v_head_dim={c.v_head_dim}, "
                f"qk_rope_head_dim={c.qk_rope_head_dim}"
            )
        self.config = c
        h = c.num_attention_heads
        self.num_heads = h
        self.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        d = c.hidden_size
        if c.q_lora_rank is None:
            self.q_proj = Linear(d, h * self.qk_head_dim, rngs=rngs, dtype=dtype)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(d, c.q_lora_rank, bias=c.attention_bias, rngs=rngs, dtype=dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, MLA_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(c.q_lora_rank, h * self.qk_head_dim, rngs=rngs, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(
            d, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias, rngs=rngs, dtype=dtype
        )
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, MLA_NORM_EPS, dtype=dtype)
        self.kv_b_proj = Linear(
            c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), rngs=rngs, dtype=dtype
        )
        self.o_proj = Linear(h * c.v_head_dim, d, bias=c.attention_bias, rngs=rngs, dtype=dtype)
        self.scale = mla_softmax_scale(c)

    def init_cache(self, batch: int, max_len: int, dtype: Any) -> KVLayerCache:
        """Decompressed per-head cache: k [B, S, H, qk_head_dim], v [B, S, H, v_head_dim]."""
        h = self.num_heads
        return {
            "k": jnp.zeros((batch, max_len, h, self.qk_head_dim), dtype),
            "v": jnp.zeros((batch, max_len, h, self.config.v_head_dim), dtype),
        }

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        cache: KVLayerCache | None,
    ) -> tuple[jax.Array, KVLayerCache | None]:
        c = self.config
        b, t, _ = x.shape
        h, nope, rope = self.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, h, self.qk_head_dim)
        q_nope, q_pe = q[..., :nope], q[..., nope:]

        compressed = self.kv_a_proj_with_mqa(x)
        latent, k_pe = compressed[..., : c.kv_lora_rank], compressed[..., c.kv_lora_rank :]
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).reshape(b, t, h, nope + c.v_head_dim)
        k_nope, v = kv[..., :nope], kv[..., nope:]

        cos, sin = cos_sin
        rotate = apply_rope_interleaved if c.rope_interleave else apply_rope
        q_pe = rotate(q_pe, cos, sin)
        k_pe = rotate(k_pe.reshape(b, t, 1, rope), cos, sin)

        q = jnp.concatenate([q_nope, q_pe], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe, (b, t, h, rope))], axis=-1)
        o, cache = attend(q, k, v, positions, cache, self.scale, None)
        return self.o_proj(o.reshape(b, t, h * c.v_head_dim)), cache
