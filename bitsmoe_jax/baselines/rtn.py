"""Round-to-nearest (RTN): uniform bits, one bf16 scale per group, symmetric or with a zero point.

The textbook baseline: groups of `group_size` consecutive weights along each output's input
(contraction) dimension.

* Symmetric (the default): scale = max|w| / (2^(b-1) - 1) rounded to bf16, codes round(w / scale)
  clipped to [-2^(b-1), 2^(b-1) - 1]. Effective bits = b + 16 / group_size (3.125 at 3 bits, g128).
  At 2 bits this grid has only three useful levels {-s, 0, s} (the code -2 lies outside the range).
* Asymmetric ("zero point", the default of the GPTQ reference code and of llama.cpp's Q*_1 types):
  the range [min(w, 0), max(w, 0)] is cut into 2^b - 1 steps, scale = (max - min) / (2^b - 1) in
  bf16, zero = round(-min / scale) stored as a b-bit integer, value = (q - zero) · scale with
  q in [0, 2^b - 1]. All 2^b levels are used. Effective bits = b + (16 + b) / group_size.

Implemented independently of BitsMoE's quantizers on purpose: it is the yardstick, not a variant of
our method.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from bitsmoe_jax.models.moe import Experts


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def asym_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 scale, integer zero) of the zero-point grid for group minima `lo` and maxima `hi`.

    The range always contains 0 (as in the GPTQ reference), so an all-positive group still
    reconstructs small weights near 0; an all-zero group gets scale 0 and zero 0 (exact zeros).
    """
    maxq = 2**bits - 1
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    scale = _bf16((hi - lo) / maxq)
    safe = np.where(scale > 0, scale, 1.0)
    zero = np.where(scale > 0, np.clip(np.rint(-lo / safe), 0, maxq), 0.0)
    return scale, zero


def rtn_quantize(
    w: np.ndarray, bits: int, group_size: int, axis: int, zero_point: bool = False
) -> np.ndarray:
    """Fake-quantize `w` with groups along `axis` (the contraction dimension)."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    n = w.shape[-1]
    pad = (-n) % group_size
    # Pad with the group's own first value rather than zeros: a zero would widen an asymmetric
    # group's range (min/max) and so change the grid of the real weights in a short last group.
    wp = np.concatenate([w, np.repeat(w[..., -1:], pad, axis=-1)], axis=-1) if pad else w
    g = wp.reshape(*wp.shape[:-1], -1, group_size)
    if zero_point:
        scale, zero = asym_params(g.min(-1, keepdims=True), g.max(-1, keepdims=True), bits)
        safe = np.where(scale > 0, scale, 1.0)
        q = np.clip(np.rint(g / safe) + zero, 0, 2**bits - 1)
        out = ((q - zero) * scale).reshape(wp.shape)[..., :n]
        return np.moveaxis(out, -1, axis)
    qmax = 2 ** (bits - 1) - 1
    scale = _bf16(np.abs(g).max(-1, keepdims=True) / qmax)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(g / safe), -(qmax + 1), qmax)
    out = (q * scale).reshape(wp.shape)[..., :n]
    return np.moveaxis(out, -1, axis)


def rtn_bpw(bits: int, group_size: int, zero_point: bool = False) -> float:
    """Stored bits per weight: the code, plus per group a bf16 scale (and a b-bit zero point)."""
    return bits + (16.0 + (bits if zero_point else 0)) / group_size


def apply_rtn(
    model: nnx.Module, bits: int, group_size: int = 128, zero_point: bool = False
) -> float:
    """Fake-quantize every routed expert of `model` in place; returns the effective bpw."""
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if not isinstance(experts, Experts):
            continue
        for w in (experts.gate, experts.up, experts.down):
            w[...] = jnp.asarray(
                rtn_quantize(w[...], bits, group_size, axis=1, zero_point=zero_point), w.dtype
            )
    return rtn_bpw(bits, group_size, zero_point)
