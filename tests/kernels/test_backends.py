"""Every backend of the routed-expert op through the shared suite (`backend_suite.BackendSuite`),
plus what is particular to each: the GPU's decode GEMVs (split and unsplit grids, 1..4 rows per
tile) and its prefill path (dequantize, grouped matmul); layouts built for the wrong backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings

from pallas_kernels.api import build_expert_kernels
from pallas_kernels.triton.op import reduction_splits
from tests.kernels.backend_suite import BackendSuite, group_sizes
from tests.kernels.conftest import TILES, E, M, projections


class TestReference(BackendSuite):
    backend = "reference"
    rtol_f32 = 1e-5


class TestXla(BackendSuite):
    backend = "xla"


class TestMosaicTpu(BackendSuite):
    backend = "mosaic_tpu"


class TestTriton(BackendSuite):
    backend = "triton"

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(sizes=group_sizes())
    def test_reductions_split_in_chunks_that_do_not_divide_the_work(self, sizes):
        self.check(sizes, splits=3)  # atomic adds over 3 chunks

    @pytest.mark.parametrize("tm", [1, 2, 4])
    @settings(max_examples=2, deadline=None, derandomize=True)
    @given(sizes=group_sizes())
    def test_gemv_with_1_to_4_rows_per_tile(self, tm, sizes):
        # decode GEMVs: an expert with more rows than tm takes several row tiles
        self.check(sizes, tm=tm)

    @settings(max_examples=3, deadline=None, derandomize=True)
    @given(sizes=group_sizes())
    def test_unsplit_grid(self, sizes):
        # splits=1: one program per output block, each over all of its expert's tiles / groups
        self.check(sizes, splits=1)

    @settings(max_examples=3, deadline=None, derandomize=True)
    @given(sizes=group_sizes())
    @example(sizes=np.array([0, 0, 0, M, 0, 0, 0, 0], np.int32))
    def test_prefill_path_dequantizes_then_multiplies(self, sizes):
        # more rows per tile than GEMV_MAX_ROWS: the kernels write each expert's factors, XLA
        # multiplies
        self.check(sizes, tm=16)

    def test_16_bit_units_on_the_prefill_path(self):
        self.check(np.array([5, 0, 3, 3, 0, 6, 4, 3], np.int32), with16=True, tm=16)

    def test_tile_sizes_of_the_other_kernel_family_are_refused(self):
        packed, _ = projections(0)
        with pytest.raises(ValueError, match="take a CodeConfig"):
            build_expert_kernels(packed, E, "triton", TILES)

    def test_reduction_splits_aim_at_enough_programs(self):
        # Mixtral decode, gate/up: 112 lane blocks × 2 experts
        assert reduction_splits(programs=224, steps=86) == 4
        assert reduction_splits(programs=2576, steps=86) == 1  # prefill: enough programs already
        assert reduction_splits(programs=8, steps=6) == 1  # never below min_steps items per chunk


def test_unknown_backend_is_refused_by_name():
    packed, _ = projections(0)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        build_expert_kernels(packed, E, "pallas")
