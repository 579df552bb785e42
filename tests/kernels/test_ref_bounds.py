"""Every load, store and atomic add of the GPU (Triton) kernels stays inside its array.

The Triton backend does no bounds checks, and the generic interpreter clamps an out-of-range access
into the array (see `ref_bounds`). A dead code slot read or added past the end passes every
interpret-mode comparison, but on the GPU it touches memory beyond the buffer. These tests run the
kernels under `ref_bounds.checked_ref_bounds` and also compare them with the pure-jnp reference.

They use group size 128, the quantizer's default. There a 3-bit group holds 130 slots
(13 words of 10 codes): the last word row's dead slots are read from ``h`` and added to gate/up past
the group, and past the last group they land in the `triton_kernels.overrun` spare columns. At the
other kernel tests' group size (32) no width has dead slots in a live chunk. Checked by mutation:
with ``overrun`` returning 0, the decode tests here fail, naming the atomic adds past the end. The
other kernel tests pass; `tests/run/test_pipeline.py` (real checkpoints, group size 128) fails on
its logits, because the interpreter's clamped add shifts live values too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import shared_shapes
from pallas_kernels.api import (
    ExpertKernels,
    build_expert_kernels,
    expert_kernel_shapes,
    swiglu_experts,
)
from tests.kernels.conftest import CODES, E, assert_matches_reference, inputs
from tests.kernels.conftest import projections as make_projections
from tests.kernels.ref_bounds import checked_ref_bounds, first_violations

GROUP_SIZE = 128  # with F = 200: one full group and one ragged group


@functools.cache
def kernels_at_group_size_128():
    packed, dense = make_projections(0, group_size=GROUP_SIZE)
    kern = jax.tree.map(jnp.asarray, build_expert_kernels(packed, E, "triton", CODES))
    assert (
        3 in kern.gate.widths and 3 in kern.down.widths
    )  # the width with dead slots in a live chunk
    return kern, tuple(dense[p] for p in ("gate", "up", "down"))


def check_in_bounds(kern, dense, sizes, tm: int, splits: int | None) -> None:
    """Run the GPU kernels in the interpreter under the bounds check: no violation, the reference's
    result."""
    zg, zu = inputs(jnp.float32)
    with checked_ref_bounds() as violations:
        run = jax.jit(
            functools.partial(
                swiglu_experts, backend="triton", interpret=True, tm=tm, splits=splits
            )
        )
        got = jax.block_until_ready(run(zg, zu, sizes, kern))
    assert not violations, first_violations(violations)
    assert_matches_reference(got, zg, zu, sizes, dense)


@pytest.mark.parametrize(
    "tm,splits",
    [
        (1, 3),  # decode GEMVs, reductions split in 3 chunks (atomic adds)
        (2, 1),  # decode GEMVs, one program per output block, 2 rows per row tile
        (16, None),  # prefill: the dequantizer writes each expert's factors, XLA multiplies
    ],
)
def test_gpu_kernels_stay_in_bounds_at_group_size_128(tm, splits):
    kern, dense = kernels_at_group_size_128()
    # empty experts; one with several row tiles
    check_in_bounds(kern, dense, jnp.asarray([1, 0, 2, 0, 3, 0, 18, 0], jnp.int32), tm, splits)


def test_a_layout_padded_to_a_shared_shape_stays_in_bounds():
    # the sparse set has fewer tiles per expert: padded to the dense set's shape, it gains
    # unreferenced tiles, word rows and scale columns, and its "no component" markers move
    # (`shared_shapes`)
    sets = [
        make_projections(seed, sparse=sparse, group_size=GROUP_SIZE)
        for seed, sparse in ((0, False), (2, True))
    ]
    shapes = [expert_kernel_shapes(packed, E, "triton", CODES) for packed, _ in sets]
    plan = shared_shapes.plan_groups([k.parts() for k in shapes], max_padding=math.inf)
    assert plan.num_groups == 1 and plan.padding > 0
    packed, dense = sets[1]
    kern = jax.tree.map(
        jnp.asarray,
        build_expert_kernels(packed, E, "triton", CODES, target=ExpertKernels(*plan.targets[0])),
    )
    dense = tuple(dense[p] for p in ("gate", "up", "down"))
    check_in_bounds(kern, dense, jnp.asarray([5, 0, 3, 3, 0, 6, 4, 3], jnp.int32), tm=2, splits=2)


def test_the_bounds_check_sees_reads_whose_values_do_not_matter():
    # independent of the kernels: an out-of-range read multiplied by zero gives the right answer in
    # the interpreter (clamped), and must still be reported; a masked one must not be
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    def call(offset: int, masked: bool):
        def kernel(x_ref, o_ref):
            i = pl.program_id(0)
            if masked:
                pos = i * 8 + offset + jnp.arange(8)
                v = plt.load(x_ref.at[pl.ds(i * 8 + offset, 8)], mask=pos < 32, other=0.0)
            else:
                v = x_ref[pl.ds(i * 8 + offset, 8)]
            o_ref[pl.ds(i * 8, 8)] = v * 0.0 + 1.0

        return jax.jit(
            pl.pallas_call(
                kernel,
                out_shape=jax.ShapeDtypeStruct((32,), jnp.float32),
                grid=(4,),
                interpret=True,
            )
        )

    x = jnp.arange(32.0)
    for offset, masked, expect in (
        (0, False, []),
        (4, False, ["get on a ref view of shape (32,), indexer 0: starts [28]"]),
        (4, True, []),
    ):
        with checked_ref_bounds() as violations:
            np.testing.assert_array_equal(np.asarray(call(offset, masked)(x)), 1.0)
        assert violations == expect, (offset, masked, violations)
