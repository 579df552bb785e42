"""Pallas kernels (interpret mode, both kernel families) against the pure-jnp reference.

The reference (`pallas_kernels.reference`) multiplies each row by its expert's *dequantized stored*
factors (`packing.dequantize_packed`), so these tests also check the load-time layout conversions
(bit-planes for the TPU family, integer codes for the GPU family). GPU paths: the decode GEMVs
(split and unsplit grids, 1..4 rows per tile) and the prefill path (dequantize, grouped matmul).
Group sizes come from hypothesis (empty experts, one expert holding every row); the factors hold
every bit-width of {0, 1, 2, 3, 4, 8} — whole experts at one width and
experts mixing all of them — plus a case with 16-bit units (the dense side path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bitsmoe_jax.method.packing import dequantize_packed, pack_segments
from pallas_kernels.api import build_expert_kernels, reduction_splits, swiglu_experts
from pallas_kernels.reference import swiglu_experts_reference
from tests.kernels.conftest import CODES, TILES, E, M, inputs, kernels, projections


@st.composite
def group_sizes(draw) -> np.ndarray:
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=E - 1, max_size=E - 1)))
    return np.diff([0, *cuts, M]).astype(np.int32)


@functools.cache
def runner(backend: str, tm: int | None, splits: int | None):
    return jax.jit(
        functools.partial(swiglu_experts, backend=backend, interpret=True, tm=tm, splits=splits)
    )


# f32 tolerance: a plane product is computed as 2·(a @ bits) − Σa (no ±1 matrix, see unpack), and a
# code GEMV as Σ a·u − (2^b−1)/2·Σa; both cancel terms of size Σ|a|·2^b: ~1e-5 of the output scale
# at 8 bits, not 1e-7.
def check(backend, sizes, dtype=jnp.float32, tm=None, with16=False, rtol=1e-4, splits=None):
    kern, (ag, au, bd) = kernels(with16, backend)
    zg, zu = inputs(dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    got = runner(backend, tm, splits)(zg, zu, gs, kern)
    want = swiglu_experts_reference(zg.astype(jnp.float32), zu.astype(jnp.float32), gs, ag, au, bd)
    scale = float(jnp.max(jnp.abs(want)))
    err = float(jnp.max(jnp.abs(got - want)))
    assert got.shape == want.shape and err <= rtol * scale, (backend, sizes.tolist(), err, scale)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(sizes=group_sizes())
@example(sizes=np.array([0, 0, 0, M, 0, 0, 0, 0], np.int32))
@example(sizes=np.array([1, 0, 2, 0, 3, 0, 18, 0], np.int32))
def test_kernels_match_reference_f32(backend, sizes):
    # Triton: reductions split in 3 chunks (atomic adds; chunk sizes that do not divide the work)
    check(backend, sizes, splits=3 if backend == "triton" else None)


@pytest.mark.parametrize("tm", [1, 2, 4])
@settings(max_examples=2, deadline=None, derandomize=True)
@given(sizes=group_sizes())
def test_triton_gemv_with_1_to_4_rows_per_tile(tm, sizes):
    # decode GEMVs: an expert with more rows than tm takes several row tiles
    check("triton", sizes, tm=tm)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(sizes=group_sizes())
def test_triton_unsplit_grid(sizes):
    # splits=1: one program per output block, each over all of its expert's tiles / groups
    check("triton", sizes, splits=1)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(sizes=group_sizes())
@example(sizes=np.array([0, 0, 0, M, 0, 0, 0, 0], np.int32))
def test_triton_prefill_path_dequantizes_then_multiplies(sizes):
    # more rows per tile than GEMV_MAX_ROWS: the kernels write each expert's factors, XLA multiplies
    check("triton", sizes, tm=16)


@pytest.mark.parametrize("tm", [None, 16])
def test_16_bit_units_take_the_dense_side_path(tm):
    # (the Mosaic family meets 16-bit units in the degenerate-layout test below)
    check("triton", np.array([5, 0, 3, 3, 0, 6, 4, 3], np.int32), with16=True, tm=tm)


@pytest.mark.parametrize("backend,tm", [("triton", None), ("triton", 16), ("mosaic", None)])
def test_bf16_activations_accumulate_in_f32(backend, tm):
    # bf16 operands (activations, h, and on the prefill path the dequantized factors), f32
    # accumulation
    check(
        backend, np.array([2, 4, 0, 6, 3, 3, 0, 6], np.int32), dtype=jnp.bfloat16, rtol=1e-2, tm=tm
    )


def test_mismatched_inputs_are_refused_by_name():
    kern, _ = kernels(False, "triton")
    zg, zu = inputs(jnp.float32)
    gs = jnp.zeros((E,), jnp.int32).at[0].set(M)
    with pytest.raises(ValueError, match="zg must be"):
        swiglu_experts(zg[:, :-1], zu, gs, kern, interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be"):
        swiglu_experts(zg, zu, gs[:-1], kern, interpret=True)
    with pytest.raises(ValueError, match="built for the 'triton' kernels"):
        swiglu_experts(zg, zu, gs, kern, backend="mosaic", interpret=True)
    packed, _ = projections(0)
    with pytest.raises(ValueError, match="take a CodeConfig"):
        build_expert_kernels(packed, E, TILES, "triton")


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_degenerate_layouts_all_zero_and_all_16_bit_projections(backend):
    # gate: every unit 16 bits (only the dense side path, no kernel tile); up: every unit 0 bits, so
    # u = 0 and acc = 0; down: the second expert has no kernel tile (all 0 bits).
    rng = np.random.default_rng(5)
    e, r, f, gsz = 2, 32, 64, 32
    units = {p: rng.standard_normal((e * r, f)).astype(np.float32) for p in ("gate", "up", "down")}
    bits = {
        "gate": np.full(e * r, 16),
        "up": np.zeros(e * r, np.int64),
        "down": np.r_[np.full(r, 3), np.zeros(r, np.int64)],
    }
    packed = {p: pack_segments(units[p], bits[p], gsz) for p in units}
    dense = [
        np.asarray(dequantize_packed(packed[p])).reshape(e, r, f) for p in ("gate", "up", "down")
    ]
    cfg = TILES if backend == "mosaic" else CODES
    kern = jax.tree.map(jnp.asarray, build_expert_kernels(packed, e, cfg, backend))
    z = jnp.asarray(rng.standard_normal((5, r)), jnp.float32)
    gs = jnp.asarray([2, 3], jnp.int32)
    got = swiglu_experts(z, z, gs, kern, interpret=True)
    want = swiglu_experts_reference(z, z, gs, *dense)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert not np.any(np.asarray(got))  # u = 0 everywhere
    # and with up at 2 bits, the all-16-bit gate and the tile-less down expert are exercised for
    # real
    packed["up"] = pack_segments(units["up"], np.full(e * r, 2), gsz)
    dense[1] = np.asarray(dequantize_packed(packed["up"])).reshape(e, r, f)
    kern = jax.tree.map(jnp.asarray, build_expert_kernels(packed, e, cfg, backend))
    got = swiglu_experts(z, z, gs, kern, interpret=True)
    want = swiglu_experts_reference(z, z, gs, *dense)
    assert float(jnp.max(jnp.abs(want))) > 0
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), atol=1e-4 * float(jnp.max(jnp.abs(want)))
    )


def test_reduction_splits_aim_at_enough_programs():
    assert (
        reduction_splits(programs=224, steps=86) == 4
    )  # Mixtral decode, gate/up: 112 lane blocks × 2 experts
    assert reduction_splits(programs=2576, steps=86) == 1  # prefill: enough programs already
    assert reduction_splits(programs=8, steps=6) == 1  # never below min_steps items per chunk
