"""The test base every backend of `pallas_kernels.api.swiglu_experts` subclasses (the tokamax
pattern): a new backend gets the whole suite by adding one class to `test_backends.py`.

The truth is a float64 numpy loop over rows on the *dequantized stored* factors
(`packing.dequantize_packed`), independent of every backend (the ``"reference"`` backend included),
so these tests also check each backend's load-time layout conversion. Group sizes come from
hypothesis (empty experts, one expert holding every row); the factors hold every bit-width of
{0, 1, 2, 3, 4, 8} — whole experts at one width and experts mixing all of them — plus cases with
16-bit units (the dense side path) and degenerate projections.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bitsmoe_jax.method.packing import dequantize_packed, pack_segments
from pallas_kernels.api import BACKENDS, build_expert_kernels, row_tile, swiglu_experts
from tests.kernels.conftest import TILE_SIZES, E, M, inputs, kernels


@st.composite
def group_sizes(draw) -> np.ndarray:
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=E - 1, max_size=E - 1)))
    return np.diff([0, *cuts, M]).astype(np.int32)


def truth(zg, zu, sizes, ag, au, bd) -> np.ndarray:
    """``acc[m] = Bd[e]·(silu(zg[m]·Ag[e]) ⊙ (zu[m]·Au[e]))`` row by row in float64."""
    zg, zu = (np.asarray(jnp.asarray(z, jnp.float32), np.float64) for z in (zg, zu))
    ag, au, bd = (np.asarray(a, np.float64) for a in (ag, au, bd))
    out = np.zeros((zg.shape[0], bd.shape[1]))
    for m, e in enumerate(np.repeat(np.arange(len(sizes)), np.asarray(sizes))):
        g, u = zg[m] @ ag[e], zu[m] @ au[e]
        out[m] = bd[e] @ (g / (1.0 + np.exp(-g)) * u)
    return out


@functools.cache
def _runner(backend: str, tm: int | None, splits: int | None):
    kw = {"tm": tm, "splits": splits} if backend in ("triton", "mosaic_tpu") else {}
    return jax.jit(functools.partial(swiglu_experts, backend=backend, interpret=True, **kw))


class BackendSuite:
    """What every backend must do; subclasses set `backend` and add their own cases."""

    backend: str = ""
    # f32 tolerance (relative to the output's largest magnitude): a plane product is computed as
    # 2·(a @ bits) − Σa, a code GEMV as Σ a·u − (2^b−1)/2·Σa; both cancel terms of size Σ|a|·2^b:
    # ~1e-5 of the output scale at 8 bits, not 1e-7.
    rtol_f32: float = 1e-4

    def check(self, sizes, dtype=jnp.float32, with16=False, rtol=None, tm=None, splits=None):
        kern, dense = kernels(with16, self.backend)
        zg, zu = inputs(dtype)
        gs = jnp.asarray(sizes, jnp.int32)
        if tm is None and self.backend in ("triton", "mosaic_tpu"):
            # the row tile `swiglu_experts` picks itself: the default and the same tile asked for
            # by name are one program (one interpret-mode compilation, ~15 s for the GPU kernels)
            tm = row_tile(zg.shape[0], kern.num_experts, self.backend)
        got = np.asarray(_runner(self.backend, tm, splits)(zg, zu, gs, kern))
        want = truth(zg, zu, sizes, *dense)
        scale = float(np.max(np.abs(want)))
        err = float(np.max(np.abs(got - want)))
        rtol = self.rtol_f32 if rtol is None else rtol
        assert got.shape == want.shape and got.dtype == np.float32
        assert err <= rtol * scale, (self.backend, np.asarray(sizes).tolist(), err, scale)

    def test_is_a_known_backend(self):
        assert self.backend in BACKENDS

    # one inherited test, several executors (one per backend class): by design here
    @settings(
        max_examples=6,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(sizes=group_sizes())
    @example(sizes=np.array([0, 0, 0, M, 0, 0, 0, 0], np.int32))
    @example(sizes=np.array([1, 0, 2, 0, 3, 0, 18, 0], np.int32))
    def test_matches_truth_f32(self, sizes):
        self.check(sizes)

    def test_bf16_activations_accumulate_in_f32(self):
        # bf16 operands (activations, h, and where factors are dequantized, the factors)
        self.check(np.array([2, 4, 0, 6, 3, 3, 0, 6], np.int32), dtype=jnp.bfloat16, rtol=1e-2)

    def test_16_bit_units(self):
        self.check(np.array([5, 0, 3, 3, 0, 6, 4, 3], np.int32), with16=True)

    def test_degenerate_projections_all_16_bit_all_zero_and_tileless_expert(self):
        # gate: every unit 16 bits (a kernel has no tile, only the dense side path); up: every unit
        # 0 bits, so u = 0 and acc = 0; down: the second expert has no kernel tile (all 0 bits).
        rng = np.random.default_rng(5)
        e, r, f, gsz = 2, 32, 64, 32
        units = {
            p: rng.standard_normal((e * r, f)).astype(np.float32) for p in ("gate", "up", "down")
        }
        bits = {
            "gate": np.full(e * r, 16),
            "up": np.zeros(e * r, np.int64),
            "down": np.r_[np.full(r, 3), np.zeros(r, np.int64)],
        }
        z = jnp.asarray(rng.standard_normal((5, r)), jnp.float32)
        gs = np.array([2, 3], np.int32)
        for up_bits in (None, 2):  # then up at 2 bits: the all-16-bit gate and the tile-less down
            if up_bits is not None:
                bits["up"] = np.full(e * r, up_bits)
            packed = {p: pack_segments(units[p], bits[p], gsz) for p in units}
            dense = [
                np.asarray(dequantize_packed(packed[p])).reshape(e, r, f)
                for p in ("gate", "up", "down")
            ]
            kern = jax.tree.map(
                jnp.asarray,
                build_expert_kernels(packed, e, self.backend, TILE_SIZES.get(self.backend)),
            )
            got = np.asarray(_runner(self.backend, None, None)(z, z, jnp.asarray(gs), kern))
            want = truth(z, z, gs, *dense)
            if up_bits is None:
                assert not np.any(got)  # u = 0 everywhere
            else:
                assert np.max(np.abs(want)) > 0
                np.testing.assert_allclose(got, want, atol=1e-4 * np.max(np.abs(want)), rtol=0)

    def test_mismatched_inputs_are_refused_by_name(self):
        kern, _ = kernels(False, self.backend)
        zg, zu = inputs(jnp.float32)
        gs = jnp.zeros((E,), jnp.int32).at[0].set(M)
        with pytest.raises(ValueError, match="zg must be"):
            swiglu_experts(zg[:, :-1], zu, gs, kern, backend=self.backend, interpret=True)
        with pytest.raises(ValueError, match="group_sizes must be"):
            swiglu_experts(zg, zu, gs[:-1], kern, backend=self.backend, interpret=True)
        other = "triton" if self.backend != "triton" else "mosaic_tpu"
        with pytest.raises(ValueError, match="this layout was built for the"):
            swiglu_experts(zg, zu, gs, kern, backend=other, interpret=True)
