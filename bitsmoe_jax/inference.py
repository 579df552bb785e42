"""Jitted entry points: full-sequence logits, and decoding (greedy or sampled) with a KV cache.

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
    return generate(model, prompt, max_new_tokens)


@partial(jax.jit, static_argnames=("top_k",))
def _sample(logits, key, temperature, top_p, top_k: int):
    """One token per row from float32 logits [B, V]: temperature, then top-k (0: off), then
    nucleus top-p (1.0: off) — the smallest set of most likely tokens whose probability reaches
    top_p, the most likely token always kept."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = (
        jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: nnx.Module,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> jax.Array:
    """Decode up to `max_new_tokens` tokens after `prompt` (int32 [B, T]) with a KV cache: one
    jitted prefill, then one jitted step per token.

    temperature 0 (the default) is greedy — Hugging Face's `generate(do_sample=False)`; above 0
    each token is sampled (`top_k`, `top_p` as in Hugging Face) with keys folded from `seed` and
    the step, so the same seed gives the same tokens. With `eos_token_id`, a row that produced it
    is finished: its later positions hold `eos_token_id`, and decoding stops when every row is —
    the result is then shorter than `max_new_tokens`. Returns int32 [B, n] (the prompt is not
    repeated).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"temperature {temperature} (>= 0), top_p {top_p} (in (0, 1]) and top_k {top_k} "
            "(>= 0; 0 = off) out of range"
        )
    prompt = jnp.asarray(prompt, jnp.int32)
    b, t = prompt.shape
    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, t + max_new_tokens)
    last, cache = _cached_step(graphdef, state, prompt, cache)
    key = jax.random.key(seed)
    done = jnp.zeros((b,), bool)
    out = []
    for step in range(max_new_tokens):
        if temperature == 0:
            tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            tok = _sample(last, jax.random.fold_in(key, step), temperature, top_p, int(top_k))
        if eos_token_id is not None:
            tok = jnp.where(done, jnp.int32(eos_token_id), tok)
            done = done | (tok == eos_token_id)
        out.append(tok)
        if len(out) == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        last, cache = _cached_step(graphdef, state, tok[:, None], cache)
    return jnp.stack(out, axis=1)
