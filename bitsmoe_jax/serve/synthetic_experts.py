"""`QuantizedExperts` from dense experts without calibration: for kernel tests and benchmarks.

Full-rank random orthonormal bases stored at 8 bits by default (so the factors are the experts
rotated into the basis; exactly up to the basis rounding), factors packed at caller-given
bit-widths. Not a quantization method — no loss model, no allocation — it only produces blocks in
the real checkpoint format with a chosen bit mix.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.packing import pack_segments
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts


def quantized_from_dense(
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    bits: dict[str, np.ndarray],
    rng: np.random.Generator,
    group_size: int = 128,
    basis_bits: int = 8,
) -> QuantizedExperts:
    """Dense experts (gate/up ``[E, D, F]``, down ``[E, F, D]``) -> `QuantizedExperts` with
    full-rank bases at ``basis_bits`` (`decompose.BASIS_BITS`); ``bits[p]`` is ``[E, D]`` (or
    ``[E·D]``) bit-widths per unit of projection ``p``."""
    gate, up, down = (np.asarray(w, np.float32) for w in (gate, up, down))
    e, d, f = gate.shape
    bases, packed = {}, {}
    for p, w in zip(
        PROJECTIONS, (gate, up, np.swapaxes(down, 1, 2)), strict=False
    ):  # all [E, D, F]
        v, _ = np.linalg.qr(rng.standard_normal((d, d)))
        stored, vq = basis_lib.quantize_basis(jnp.asarray(v, jnp.float32), basis_bits)
        bases[p] = basis_lib.stored_basis_arrays(
            np.asarray(stored.values),
            None if stored.scales is None else np.asarray(stored.scales),
            basis_bits,
        )
        factors = np.einsum("dr,edf->erf", np.asarray(vq, np.float64), w)  # [E, r, F]
        packed[p] = pack_segments(
            factors.reshape(e * d, f).astype(np.float32),
            np.asarray(bits[p]).reshape(-1),
            group_size,
        )
    return QuantizedExperts(e, bases, packed)
