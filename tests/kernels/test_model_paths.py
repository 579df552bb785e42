"""The shipped reference model with quantized experts: same logits through every backend.

Every MoE layer of the reference model (3 layers, D = F = 256, 16 experts, top-2) is replaced by a
`QuantizedExperts` in the checkpoint format (8-bit orthonormal bases, factors packed at random
widths from {0, 1, 2, 3, 4, 8, 16}, group 128) and passed through ``to_tree``/``from_tree``. The XLA
path (dequantize, grouped matmul) is the reference for the Pallas path (interpret mode on CPU, the
GPU family's default tile sizes) and for ``"reference"``. Also: the switch's validation and
defaults.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.packing import pack_segments
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts, set_backend
from bitsmoe_jax.serve.synthetic_experts import quantized_from_dense
from pallas_kernels.api import resolve_backend
from pallas_kernels.lowered import export_for_hardware, kernel_configs


def quantized_experts(experts, rng, widths=(0, 1, 2, 3, 4, 8, 16)) -> QuantizedExperts:
    """The layer's dense experts in the checkpoint format, random widths, through
    to_tree/from_tree."""
    dense = [np.asarray(getattr(experts, p)[...], np.float32) for p in PROJECTIONS]
    e, d, _ = dense[0].shape
    p_bits = np.array(
        [{0: 0.15, 1: 0.15, 2: 0.25, 3: 0.2, 4: 0.1, 8: 0.1, 16: 0.05}[b] for b in widths]
    )
    bits = {p: rng.choice(widths, p=p_bits / p_bits.sum(), size=(e, d)) for p in PROJECTIONS}
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


# per layer: other code widths (after promotion to a tile's widest member) and shapes, so unpadded
# layouts lower to different kernels
LAYER_WIDTHS = ((1,), (0, 2), (0, 1, 2, 3, 4, 8, 16))


@pytest.fixture(scope="module")
def mixed_model():
    model, config = load_model(REFERENCE_DIR)
    rng = np.random.default_rng(2)
    for layer, widths in zip(model.layers, LAYER_WIDTHS, strict=False):
        layer.mlp.experts = quantized_experts(layer.mlp.experts, rng, widths)
    return model, np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 9))


def kernel_calls(model, backend: str, max_padding: float) -> list[str]:
    """The kernel custom calls of the model's one-token forward lowered for GPU / TPU, as their
    backend configs (the kernel IR and grid): XLA compiles one kernel per distinct config."""
    assert set_backend(model, backend, max_padding=max_padding, interpret=False) == 3
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    exported = export_for_hardware(forward, backend, state, jnp.zeros((1, 1), jnp.int32))
    return kernel_configs(exported.mlir_module(), backend)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_layers_share_one_compiled_kernel_each(mixed_model, backend):
    model, _ = mixed_model
    try:
        shared = kernel_calls(model, backend, max_padding=math.inf)
        alone = kernel_calls(model, backend, max_padding=0.0)
    finally:
        set_backend(model, "xla")
    # gate/up and down: lowered once for the three layers (one nested jit), so two kernels to
    # compile
    assert len(shared) == len(set(shared)) == 2
    # unpadded, each layer has its own two kernels
    assert len(alone) == 6 and len(set(alone)) == 6


@pytest.mark.parametrize("max_padding", [0.0, math.inf])
def test_shared_shape_logits_equal_xla_logits(mixed_model, max_padding):
    model, ids = mixed_model
    set_backend(model, "xla")
    want = np.asarray(jit_logits(model)(ids))
    set_backend(model, "triton", max_padding=max_padding)
    got = np.asarray(jit_logits(model)(ids))
    set_backend(model, "xla")
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


# the Mosaic family is checked against the reference in the kernel backend suite
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backend_logits_equal_xla_logits(quantized_model, backend):
    model, ids = quantized_model
    assert set_backend(model, "xla") == 3
    want = np.asarray(jit_logits(model)(ids))
    set_backend(model, backend)
    got = np.asarray(jit_logits(model)(ids))
    set_backend(model, "xla")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_backend_switch(monkeypatch):
    from pallas_kernels import api

    assert resolve_backend("auto", "cpu") == "xla"
    # Unverified on hardware: "auto" stays XLA; once a platform is verified it takes its kernels.
    assert resolve_backend("auto", "gpu") == resolve_backend("auto", "tpu") == "xla"
    monkeypatch.setattr(api, "VERIFIED_PLATFORMS", frozenset({"gpu"}))
    assert resolve_backend("auto", "cuda") == "triton" and resolve_backend("auto", "tpu") == "xla"
    monkeypatch.setattr(api, "VERIFIED_PLATFORMS", frozenset({"tpu"}))
    assert resolve_backend("auto", "tpu") == "mosaic_tpu"
    assert resolve_backend("xla", "gpu") == "xla"
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        resolve_backend("pallas")
    qe = QuantizedExperts(
        2,
        {p: {} for p in PROJECTIONS},
        {p: pack_segments(np.ones((8, 64), np.float32), [2] * 8, 32) for p in PROJECTIONS},
        backend="triton",
    )
    with pytest.raises(ValueError, match="set_backend"):
        qe.resolved_backend()
    qe.set_backend("auto")  # CPU: XLA, no kernel layout built
    assert qe.resolved_backend() == "xla" and qe.kernels is None
