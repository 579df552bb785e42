"""The shipped reference model with quantized experts: same logits through ``"xla"`` and Pallas.

Every MoE layer of the reference model (3 layers, D = F = 256, 16 experts, top-2) is replaced by a
`QuantizedExperts` in the checkpoint format (8-bit orthonormal bases, factors packed at random
widths from {0, 1, 2, 3, 4, 8, 16}, group 128) and passed through ``to_tree``/``from_tree``. The XLA
path (dequantize, grouped matmul) is the reference for the Pallas path (interpret mode on CPU, the
GPU family's default tile sizes). Also: the switch's validation and defaults.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.quant.coefficients import PROJECTIONS
from bitsmoe_jax.quant.packing import pack_segments
from bitsmoe_jax.quant.qmoe import QuantizedExperts, set_implementation
from bitsmoe_jax.quant.synthetic_experts import quantized_from_dense
from bitsmoe_jax.train_reference import REFERENCE_DIR
from pallas_kernels.api import resolve_implementation


def quantized_experts(experts, rng) -> QuantizedExperts:
    """The layer's dense experts in the checkpoint format, random widths, through to_tree/from_tree."""
    dense = [np.asarray(getattr(experts, p)[...], np.float32) for p in PROJECTIONS]
    e, d, _ = dense[0].shape
    p_bits = [0.15, 0.15, 0.25, 0.2, 0.1, 0.1, 0.05]
    bits = {p: rng.choice([0, 1, 2, 3, 4, 8, 16], p=p_bits, size=(e, d)) for p in PROJECTIONS}
    qe = quantized_from_dense(*dense, bits, rng)
    return QuantizedExperts.from_tree(*qe.to_tree())


@pytest.fixture(scope="module")
def quantized_model():
    model, config = load_model(REFERENCE_DIR)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.mlp.experts = quantized_experts(layer.mlp.experts, rng)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 9))
    return model, ids


@pytest.mark.parametrize("backend", ["triton"])  # the Mosaic family is checked against the reference in test_kernels
def test_pallas_logits_equal_xla_logits(quantized_model, backend):
    model, ids = quantized_model
    assert set_implementation(model, "xla") == 3
    want = np.asarray(jit_logits(model)(ids))
    set_implementation(model, "pallas", backend=backend)
    got = np.asarray(jit_logits(model)(ids))
    set_implementation(model, "xla")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_implementation_switch(monkeypatch):
    from pallas_kernels import api

    assert resolve_implementation(None, "cpu") == "xla"
    # Unverified on hardware: the default stays XLA; once a platform is verified it becomes Pallas.
    assert resolve_implementation(None, "gpu") == resolve_implementation(None, "tpu") == "xla"
    monkeypatch.setattr(api, "VERIFIED_PLATFORMS", frozenset({"gpu"}))
    assert resolve_implementation(None, "cuda") == "pallas" and resolve_implementation(None, "tpu") == "xla"
    assert resolve_implementation("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        resolve_implementation("triton")
    qe = QuantizedExperts(
        2, {p: {} for p in PROJECTIONS}, {p: pack_segments(np.ones((8, 64), np.float32), [2] * 8, 32) for p in PROJECTIONS},
        implementation="pallas",
    )
    with pytest.raises(ValueError, match="set_implementation"):
        qe.resolved_implementation()
    qe.set_implementation(None)  # CPU: XLA, no kernel layout built
    assert qe.resolved_implementation() == "xla" and qe.kernels is None
