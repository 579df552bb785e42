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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bitsmoe_jax.method.packing import pack_bitplanes, unpack_bitplanes_jnp

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


#: Stored precisions of a shared basis: symmetric integer codes with one bf16 scale per row of
#: ``V`` (4, 6, 8 bits) or bf16 values (16). The expert factors are fitted to the dequantized basis,
#: so a coarser basis costs fidelity only through the factors it leaves to quantize; at equal bits
#: per weight its saved bits buy more factor bits (docs/quantizing.md, "Basis precision").
BASIS_BITS = (4, 6, 8, 16)


class QuantizedBasis(NamedTuple):
    """A quantized basis: ``values`` int8 codes ``[D, r]`` in ``[-(2**(b-1)-1), 2**(b-1)-1]`` with
    bf16 ``scales [D]`` (4, 6, 8 bits), or bf16 ``values`` and ``scales=None`` (16 bits)."""

    values: jax.Array
    scales: jax.Array | None
    bits: int


def _check_basis_bits(bits: int) -> int:
    if int(bits) not in BASIS_BITS:
        raise ValueError(f"basis bits must be one of {BASIS_BITS}, got {bits}")
    return int(bits)


def quantize_basis(v: jax.Array, bits: int = 8) -> tuple[QuantizedBasis, jax.Array]:
    """Quantize the shared basis; returns ``(quantized, dequantized float32 [D, r])``.

    4, 6, 8 bits: symmetric codes in ``[-(2**(b-1)-1), 2**(b-1)-1]`` with one bf16 scale per row
    of ``V`` (per hidden-dim index). Per row because that is where the scale folds away at
    inference: ``z = Vᵀx`` becomes ``Qᵀ(s ⊙ x)`` and ``y = U acc`` becomes ``s ⊙ (Q acc)`` — one
    elementwise multiply on a D-vector, then a plain integer-code matmul. The scale is rounded *up*
    to a bf16 value before the codes are computed, so the row maximum never clips and the
    dequantized basis is exactly ``codes · stored scale``. The orthonormal columns of ``V`` have
    comparable entries, so max-abs scaling is what the design measured as lossless at 8 bits; at
    4 or 6 bits the basis is no longer orthonormal, but it stays full rank and the factors are
    fitted to exactly this dequantized basis. 16 bits: bf16 values.
    """
    bits = _check_basis_bits(bits)
    v = jnp.asarray(v).astype(jnp.float32)
    if bits == 16:
        stored = v.astype(jnp.bfloat16)
        return QuantizedBasis(stored, None, 16), jnp.asarray(np.asarray(stored).astype(np.float32))
    qmax = np.float32(2 ** (bits - 1) - 1)
    vn = np.asarray(v)
    row_max = np.abs(vn).max(axis=1) if vn.size else np.zeros(vn.shape[0], np.float32)
    scale = _bf16_ceil(row_max / qmax)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    codes = np.clip(np.rint(vn / safe[:, None]), -qmax, qmax).astype(np.int8)
    deq = codes.astype(np.float32) * scale[:, None]
    return (
        QuantizedBasis(jnp.asarray(codes), jnp.asarray(scale.astype(ml_dtypes.bfloat16)), bits),
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
    """Bits to store a ``[D, r]`` basis as :func:`stored_basis_arrays` lays it out: ``8·D·r`` int8
    codes, or ``b·ceil(D/32)·32·r`` bit-plane words for 4 and 6 bits (each of the ``r`` columns
    packed over D, padded to whole 32-value blocks), plus ``16·D`` for the row scales; or
    ``16·D·r`` (bf16)."""
    bits = _check_basis_bits(bits)
    d, r = int(d), int(r)
    if bits == 16:
        return 16 * d * r
    rows = d if bits == 8 else -(-d // 32) * 32
    return bits * rows * r + 16 * d


def stored_basis_arrays(codes: np.ndarray, scale: np.ndarray | None, bits: int) -> dict:
    """The arrays a checkpoint stores for a basis: ``{"q": int8 [D, r], "scale": bf16 [D]}`` at 8
    bits, ``{"q": bf16 [D, r]}`` at 16, and at 4 or 6 bits ``{"planes": uint32 [r, ceil(D/32)·b],
    "scale": bf16 [D]}``: the codes' transpose in `packing.pack_bitplanes`' bit-plane layout —
    packed along D, which real models make a multiple of 32, so that no column pads."""
    bits = _check_basis_bits(bits)
    if bits in (8, 16):
        return {"q": codes} | ({"scale": scale} if scale is not None else {})
    planes = pack_bitplanes(np.ascontiguousarray(np.asarray(codes).T), bits)
    return {"planes": planes, "scale": scale}


def basis_codes(arrays: dict) -> jax.Array:
    """The ``[D, r]`` codes (or bf16 values) of a stored basis, whatever its layout (jnp: inside
    the served forward a packed basis is unpacked where it is read)."""
    if "planes" not in arrays:
        return arrays["q"][...]
    d = int(arrays["scale"][...].shape[0])
    return unpack_bitplanes_jnp(arrays["planes"][...], basis_bits_of(arrays), d).T


def basis_nbytes(arrays: Any) -> int:
    """Bytes of a stored basis's arrays — codes, bit-plane words, bf16 values, row scales: what it
    costs on disk and what a decode step reads of it (shape and dtype only; nothing is loaded)."""
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in arrays.values()
    )


def has_basis(arrays: Any) -> bool:
    """Whether stored basis arrays hold a basis (the "no basis" ablation stores none)."""
    return "q" in arrays or "planes" in arrays


def basis_bits_of(arrays: dict) -> int:
    """The stored precision of a basis from its arrays (8: int8 codes, 16: bf16 values, else the
    bit-plane count)."""
    if "planes" in arrays:
        d = int(arrays["scale"][...].shape[0])
        return int(arrays["planes"][...].shape[-1]) // -(-d // 32)
    return 8 if "scale" in arrays else 16


__all__ = [
    "gram_rows",
    "gram_cols",
    "basis_from_gram",
    "expert_factors_rows",
    "expert_factors_cols",
    "BASIS_BITS",
    "QuantizedBasis",
    "quantize_basis",
    "basis_stored_bits",
    "stored_basis_arrays",
    "basis_codes",
    "basis_bits_of",
    "has_basis",
    "basis_nbytes",
]
