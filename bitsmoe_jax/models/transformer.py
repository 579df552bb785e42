"""The decoder-only MoE transformer used for every family.

Family differences live in `ModelConfig` flags and in three places only: the attention module (GQA,
MLA for DeepSeek-V2/V3, Gated DeltaNet on Qwen3-Next's linear layers), which layers are MoE
(`ModelConfig.is_moe_layer`), and the MoE block's
router / shared experts. Calling contract (relied on by evaluation, quantization and users):

    logits = model(input_ids) # int32 [B, T] -> float32 [B, T, V] cache = model.init_cache(B,
    max_len) logits, cache = model(input_ids, cache=cache) # prefill, then one token at a time
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.layers import (
    Attention,
    DenseMLP,
    Linear,
    RMSNorm,
    _init,
    rope_cos_sin,
    shapes_only,
)
from bitsmoe_jax.models.moe import MoEBlock

Cache = dict[str, Any]  # {"layers": [per-layer kv dict], "length": int32 scalar}


def make_attention(config: ModelConfig, rngs: nnx.Rngs, dtype: Any, layer: int) -> nnx.Module:
    if config.is_linear_attention(layer):
        from bitsmoe_jax.models.linear_attention import GatedDeltaNet

        return GatedDeltaNet(config, rngs=rngs, dtype=dtype)
    if config.is_mla:
        from bitsmoe_jax.models.mla import MLAAttention

        return MLAAttention(config, rngs=rngs, dtype=dtype)
    return Attention(config, rngs=rngs, dtype=dtype, layer=layer)


class DecoderLayer(nnx.Module):
    def __init__(
        self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32
    ):
        c = config
        norm = dict(dtype=dtype, offset=c.norm_offset)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **norm)
        # the token mixer, named as transformers names it (Qwen3-Next: `linear_attn` on its
        # Gated DeltaNet layers); `mixer` is whichever the layer has
        mixer = make_attention(c, rngs, dtype, layer)
        linear = c.is_linear_attention(layer)
        self.self_attn = None if linear else mixer
        self.linear_attn = mixer if linear else None
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **norm)
        self.is_moe = c.is_moe_layer(layer)
        if self.is_moe:
            self.mlp: nnx.Module = MoEBlock(c, rngs=rngs, dtype=dtype)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size, rngs=rngs, dtype=dtype)

    @property
    def mixer(self) -> nnx.Module:
        return self.self_attn if self.linear_attn is None else self.linear_attn

    def __call__(self, x, positions, cos_sin, cache):
        h, cache = self.mixer(self.input_layernorm(x), positions, cos_sin, cache)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ self.embedding[...].astype(x.dtype).T


class MoETransformer(nnx.Module):
    """A causal MoE language model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, GLM-4.5) in
    Flax NNX."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        c = config
        self.config = c
        self.dtype = dtype
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [DecoderLayer(c, i, rngs=rngs, dtype=dtype) for i in range(c.num_hidden_layers)]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, offset=c.norm_offset)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else Linear(c.hidden_size, c.vocab_size, rngs=rngs, dtype=dtype)
        )

    def init_cache(self, batch: int, max_len: int, dtype: Any | None = None) -> Cache:
        """An empty KV cache for `max_len` positions (prompt + generated tokens)."""
        dt = dtype or self.dtype
        return {
            "layers": [layer.mixer.init_cache(batch, max_len, dt) for layer in self.layers],
            "length": jnp.zeros((), jnp.int32),
        }

    def hidden_states(
        self, input_ids: jax.Array, cache: Cache | None = None
    ) -> tuple[jax.Array, Cache | None]:
        """Final-norm hidden states [B, T, D] (and the updated cache when one is given)."""
        b, t = input_ids.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache["length"]
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        cos_sin = rope_cos_sin(self.config, positions, self.dtype)
        x = self.embed_tokens(input_ids).astype(self.dtype)
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, lc = layer(x, positions, cos_sin, None if cache is None else cache["layers"][i])
            new_layers.append(lc)
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, {"layers": new_layers, "length": start + t}

    def logits(self, x: jax.Array) -> jax.Array:
        out = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, cache: Cache | None = None):
        x, new_cache = self.hidden_states(input_ids, cache)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)


def build_model(
    config: ModelConfig, *, dtype: Any = jnp.float32, seed: int = 0, abstract: bool = False
) -> MoETransformer:
    """A randomly initialised model, or with `abstract=True` one whose params are shape structs
    only."""
    if abstract:
        with shapes_only():
            return nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(seed), dtype=dtype))
    return MoETransformer(config, rngs=nnx.Rngs(seed), dtype=dtype)


def count_params(model: nnx.Module) -> int:
    """Number of parameters; works on abstract (`nnx.eval_shape`) models without allocating."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def layer_positions(batch: int, seq: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def attention_part(
    layer: DecoderLayer, x: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """(residual after attention, MoE/MLP input) for hidden states x [B, T, D]: the half of a
    decoder layer that layer-by-layer calibration runs before the experts."""
    b, t, _ = x.shape
    pos = layer_positions(b, t)
    h, _ = layer.mixer(layer.input_layernorm(x), pos, rope_cos_sin(config, pos, x.dtype), None)
    r = x + h
    return r, layer.post_attention_layernorm(r)
