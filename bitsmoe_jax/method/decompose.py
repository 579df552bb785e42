"""Shared spectral basis of one MoE layer from the Gram matrix of its experts (pure JAX).

gate/up: the experts ``W_e`` (F×D) stacked by rows, ``[W_1; …; W_E]`` (E·F × D) = ``U S Vᵀ``. Its
right singular vectors ``V`` are the eigenvectors of ``Σ_e W_eᵀ W_e`` (D×D) and the eigenvalues are
``S²``. down: the experts ``W_e`` (D×F) stacked by columns, ``[W_1 … W_E]`` (D × E·F); its left
singular vectors are the eigenvectors of ``Σ_e W_e W_eᵀ``.

Going through the D×D Gram matrix instead of an SVD of the E·F×D stack is what makes the basis
shardable: the Gram matrix is a sum over experts, so with the expert axis sharded each device
contracts its own experts and XLA inserts one all-reduce of a D×D matrix; only the small
eigendecomposition runs replicated. (The quantization pipeline uses the order-fixed variant in
`quant/sharded.py`, whose sum over experts is bit-identical on every mesh; these functions are the
plain-XLA form, whose all-reduce order is the collective's.) The contraction is written as a single
``dot_general`` over the expert and intermediate axes together rather than as per-expert products
followed by a sum: the result is the same sum over experts (same all-reduce under sharding), but no
``[E, D, D]`` intermediate is ever materialised (128 experts × 2048² floats would be 2 GiB).

All products accumulate in float32 (float64 when ``jax_enable_x64`` is on) at
``Precision.HIGHEST``: on TPU and on GPUs with TF32 the default matmul precision would round the
inputs to bf16/TF32, which the eigenvectors of a Gram matrix (whose condition number is the square
of the weights') cannot afford.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _acc_dtype() -> jnp.dtype:
    """float64 when x64 is enabled, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@jax.jit
def gram_rows(w: jax.Array) -> jax.Array:
    """``Σ_e W_eᵀ W_e`` for experts stacked by rows, ``w [E, F, D] -> [D, D]`` (gate / up)."""
    w = jnp.asarray(w).astype(_acc_dtype())
    return jnp.einsum("efd,efk->dk", w, w, precision=_HIGHEST, preferred_element_type=_acc_dtype())


@jax.jit
def gram_cols(w: jax.Array) -> jax.Array:
    """``Σ_e W_e W_eᵀ`` for experts stacked by columns, ``w [E, D, F] -> [D, D]`` (down)."""
    w = jnp.asarray(w).astype(_acc_dtype())
    return jnp.einsum("edf,ekf->dk", w, w, precision=_HIGHEST, preferred_element_type=_acc_dtype())


@functools.partial(jax.jit, static_argnames=("rank",))
def basis_from_gram(gram: jax.Array, rank: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` eigenvectors and eigenvalues of a symmetric PSD Gram matrix.

    Returns ``(V [D, r], eigenvalues [r])`` sorted by decreasing eigenvalue (``r = D`` when
    ``rank`` is None). Eigenvalues are clipped at 0: a Gram matrix is PSD, so negative values are
    rounding noise. Each column is sign-normalised so that its entry of largest magnitude is
    positive (first such entry on ties): eigenvectors are only defined up to sign, and fixing it
    makes factors, packed checkpoints and their fingerprints reproducible across runs and
    devices.
    """
    gram = jnp.asarray(gram).astype(_acc_dtype())
    d = gram.shape[-1]
    r = d if rank is None else int(rank)
    if not 0 < r <= d:
        raise ValueError(f"rank must be in [1, {d}], got {rank}")
    gram = 0.5 * (gram + gram.T)  # exact symmetry; eigh reads one triangle
    evals, evecs = jnp.linalg.eigh(gram)
    evals = evals[::-1][:r]
    evecs = evecs[:, ::-1][:, :r]
    pivot = jnp.argmax(jnp.abs(evecs), axis=0)
    sign = jnp.where(evecs[pivot, jnp.arange(r)] < 0, -1.0, 1.0).astype(evecs.dtype)
    return evecs * sign[None, :], jnp.maximum(evals, 0.0)


@jax.jit
def expert_factors_rows(w: jax.Array, v: jax.Array) -> jax.Array:
    """``A_e = W_e V``: ``w [E, F, D]``, ``v [D, r]`` -> ``[E, F, r]`` (gate / up)."""
    dt = _acc_dtype()
    return jnp.einsum(
        "efd,dr->efr", jnp.asarray(w).astype(dt), jnp.asarray(v).astype(dt), precision=_HIGHEST
    )


@jax.jit
def expert_factors_cols(w: jax.Array, u: jax.Array) -> jax.Array:
    """``B_e = Uᵀ W_e``: ``w [E, D, F]``, ``u [D, r]`` -> ``[E, r, F]`` (down)."""
    dt = _acc_dtype()
    return jnp.einsum(
        "dr,edf->erf", jnp.asarray(u).astype(dt), jnp.asarray(w).astype(dt), precision=_HIGHEST
    )


class QuantizedBasis(NamedTuple):
    """A stored basis: ``values`` int8 ``[D, r]`` with bf16 ``scales [D]`` (8 bits), or bf16
    ``values`` and ``scales=None`` (16 bits)."""

    values: jax.Array
    scales: jax.Array | None
    bits: int


def quantize_basis(v: jax.Array, bits: int = 8) -> tuple[QuantizedBasis, jax.Array]:
    """Store the shared basis at 8 or 16 bits; returns ``(stored, dequantized float32 [D, r])``.

    8 bits: symmetric int8 in ``[-127, 127]`` with one bf16 scale per row of ``V`` (per hidden-dim
    index). Per row because that is where the scale folds away at inference: ``z = Vᵀx`` becomes
    ``Qᵀ(s ⊙ x)`` and ``y = U acc`` becomes ``s ⊙ (Q acc)`` — one elementwise multiply on a
    D-vector, then a plain int8 matmul. The scale is rounded *up* to a bf16 value before the
    codes are computed, so the row maximum never clips and the dequantized basis is exactly
    ``codes · stored scale``. The orthonormal columns of ``V`` have comparable entries, so
    max-abs scaling at 255 levels is what the design measured as lossless.
    16 bits: bf16 values.
    """
    v = jnp.asarray(v).astype(jnp.float32)
    if bits == 16:
        stored = v.astype(jnp.bfloat16)
        return QuantizedBasis(stored, None, 16), jnp.asarray(np.asarray(stored).astype(np.float32))
    if bits != 8:
        raise ValueError(f"basis bits must be 8 or 16, got {bits}")
    vn = np.asarray(v)
    row_max = np.abs(vn).max(axis=1) if vn.size else np.zeros(vn.shape[0], np.float32)
    scale = _bf16_ceil(row_max / np.float32(127.0))
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(vn / safe[:, None]), -127, 127).astype(np.int8)
    deq = codes.astype(np.float32) * scale[:, None]
    return (
        QuantizedBasis(jnp.asarray(codes), jnp.asarray(scale.astype(ml_dtypes.bfloat16)), 8),
        jnp.asarray(deq),
    )


def _bf16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest bfloat16 value >= ``x`` (non-negative float32 input), returned as float32."""
    x = np.asarray(x, np.float32)
    r = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    low = r < x
    if np.any(low):
        bits_ = r[low].view(np.uint32) + np.uint32(1 << 16)  # next bf16 up (positive values)
        r = r.copy()
        r[low] = bits_.view(np.float32)
    return r


def basis_stored_bits(d: int, r: int, bits: int = 8) -> int:
    """Bits to store a ``[D, r]`` basis: ``8·D·r + 16·D`` (int8 + per-row bf16 scales) or
    ``16·D·r``."""
    if bits == 8:
        return 8 * int(d) * int(r) + 16 * int(d)
    if bits == 16:
        return 16 * int(d) * int(r)
    raise ValueError(f"basis bits must be 8 or 16, got {bits}")


__all__ = [
    "gram_rows",
    "gram_cols",
    "basis_from_gram",
    "expert_factors_rows",
    "expert_factors_cols",
    "QuantizedBasis",
    "quantize_basis",
    "basis_stored_bits",
]
