"""Round-to-nearest (RTN): uniform bits, symmetric integers, one bf16 scale per group.

The textbook baseline: groups of `group_size` consecutive weights along each output's input
(contraction) dimension, scale = max|w| / (2^(b-1) - 1) rounded to bf16, codes
round(w / scale) clipped to [-2^(b-1), 2^(b-1) - 1]. Effective bits = b + 16 / group_size
(3.125 at 3 bits, g128). Implemented independently of BitsMoE's quantizers on purpose: it is
the yardstick, not a variant of our method.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from bitsmoe_jax.models.moe import Experts


def rtn_quantize(w: np.ndarray, bits: int, group_size: int, axis: int) -> np.ndarray:
    """Fake-quantize `w` with groups along `axis` (the contraction dimension)."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    n = w.shape[-1]
    pad = (-n) % group_size
    wp = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
    g = wp.reshape(*wp.shape[:-1], -1, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(-1, keepdims=True) / qmax
    scale = scale.astype(ml_dtypes.bfloat16).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(g / safe), -(qmax + 1), qmax)
    out = (q * scale).reshape(wp.shape)[..., :n]
    return np.moveaxis(out, -1, axis)


def rtn_bpw(bits: int, group_size: int) -> float:
    return bits + 16.0 / group_size


def apply_rtn(model: nnx.Module, bits: int, group_size: int = 128) -> float:
    """Fake-quantize every routed expert of `model` in place; returns the effective bpw."""
    for layer in model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if not isinstance(experts, Experts):
            continue
        for w in (experts.gate, experts.up, experts.down):
            w[...] = jnp.asarray(rtn_quantize(w[...], bits, group_size, axis=1), w.dtype)
    return rtn_bpw(bits, group_size)
