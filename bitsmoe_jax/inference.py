"""Jitted entry points: full-sequence logits, and greedy decoding with a KV cache.

NNX modules are split into a static graph definition and a state pytree once, so jitted functions
take plain arrays and compile once per shape. Works the same for dense and quantized models.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


@partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, input_ids):
    return nnx.merge(graphdef, state)(input_ids)


@partial(jax.jit, static_argnums=0, donate_argnums=3)
def _cached_step(graphdef, state, input_ids, cache):
    logits, cache = nnx.merge(graphdef, state)(input_ids, cache=cache)
    return logits[:, -1], cache


def jit_logits(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """`f(input_ids) -> logits` compiled with jax.jit (one compile per input shape)."""
    graphdef, state = nnx.split(model)
    return lambda ids: _logits(graphdef, state, jnp.asarray(ids, jnp.int32))


def greedy_generate(model: nnx.Module, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: one jitted prefill over the prompt, then one jitted step per token.

    prompt int32 [B, T] -> generated tokens int32 [B, max_new_tokens] (the prompt is not repeated).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    b, t = prompt.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, t + max_new_tokens)
    last, cache = _cached_step(graphdef, state, prompt, cache)
    out = []
    for _ in range(max_new_tokens):
        tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
        out.append(tok)
        if len(out) == max_new_tokens:
            break
        last, cache = _cached_step(graphdef, state, tok[:, None], cache)
    return jnp.stack(out, axis=1)
