"""In-kernel unpacking of t-major bit-plane blocks and the small matmul of the TPU kernels.

Everything here is plain `jnp`/`lax` on values (no refs), so the same code runs inside Mosaic (TPU)
and interpret-mode kernels. See `layout` for the word order it assumes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

WORD_BITS = 32


def plane_bits(words: jax.Array, t0: int, count: int, dtype) -> jax.Array:
    """Bits ``t0 … t0+count-1`` of ``words [R, L]`` (int32) as 0/1 -> ``[count·R, L]`` in ``dtype``.

    Row ``t·R + j`` of the result is bit ``t0 + t`` of word row ``j`` — the t-major order of the
    layout, so the result is a contiguous slice of values and the reshape only merges leading axes
    (free on TPU when ``R`` is a multiple of 8, a register re-index on GPU).
    """
    r, lanes = words.shape
    shifts = t0 + jax.lax.broadcasted_iota(jnp.int32, (count, 1, 1), 0)
    bits = jax.lax.shift_right_logical(jnp.broadcast_to(words[None], (count, r, lanes)), shifts) & 1
    # Reshape while 32-bit (TPU tiles 32-bit values (8, 128): merging leading axes is free; bf16
    # tiles are (16, 128)), and convert through float32 (Mosaic converts int32 to f32 on every TPU
    # generation).
    return bits.reshape(count * r, lanes).astype(jnp.float32).astype(dtype)


def signed_plane_product(
    a: jax.Array, words: jax.Array, t0: int, count: int, use_dot: bool
) -> jax.Array:
    """``a [m, count·R] @ (2·bits − 1)`` in float32, for the bits of `plane_bits`.

    Computed as ``2·(a @ bits) − Σ_k a[:, k]``: the ±1 matrix is never formed, which saves two
    integer operations per unpacked weight bit (the unpack, not the bytes, is the cost of a
    bit-plane GEMV).
    """
    bits = plane_bits(words, t0, count, a.dtype)
    return 2.0 * small_matmul(a, bits, use_dot) - jnp.sum(
        a.astype(jnp.float32), axis=1, keepdims=True
    )


def plane_weight(p: jax.Array) -> jax.Array:
    """``2^p`` as float32 for a traced integer plane index ``p``."""
    return jnp.left_shift(jnp.int32(1), p).astype(jnp.float32)


def small_matmul(a: jax.Array, b: jax.Array, use_dot: bool) -> jax.Array:
    """``a [m, k] @ b [k, n]`` in float32.

    ``use_dot`` (static) picks the MXU / tensor-core dot; otherwise a broadcast multiply and sum —
    Triton's dot needs every dimension ≥ 16, and at decode ``m`` is 1..8 rows where a GEMV-style
    reduction is what the hardware would do anyway.
    """
    if use_dot:
        # float32 operands: full precision (Triton would otherwise round them to tf32); the ±1
        # matrix is exact either way, bf16 operands are the production path.
        precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)
