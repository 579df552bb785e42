"""The kernel layout decodes back to exactly the stored factors (numpy, independent of the kernels).

The decoder here follows the documented word order (bit ``t`` of word row ``j`` is value ``t·R + j``
of the block, planes are ±1 with weight ``2^p``), written from the docstring, not from the packer.
"""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.mosaic_tpu.layout import (
    TileConfig,
    plane_tiles_from_packed,
    synthetic_plane_tiles,
)
from pallas_kernels.tiles import random_allocation
from tests.kernels.conftest import GS, TILES, E, F, R, assert_position_maps, projections


def signed_planes_value(planes: np.ndarray) -> np.ndarray:
    """[B, ...] bits -> Σ_p 2^p (2·bit_p − 1)."""
    w = (2.0 ** np.arange(planes.shape[0])).reshape(-1, *([1] * (planes.ndim - 1)))
    return np.sum(w * (2.0 * planes - 1.0), axis=0)


def decode_layout(pt) -> np.ndarray:
    """Dense [E, r, F] float64 from a PlaneTiles, via the documented bit order."""
    out = np.zeros((pt.num_experts, pt.r, pt.n_padded))
    words = np.asarray(pt.words).view(np.uint32)
    scales = np.asarray(pt.scales).astype(np.float64)[:, 0, :]  # [Gp, T·tile]
    t = np.arange(32, dtype=np.uint32)
    for e in range(pt.num_experts):
        for lt in range(int(pt.expert_ntiles[e])):
            tid = int(pt.expert_tiles[e, lt])
            q0, b = int(pt.tile_q0[tid]), int(pt.tile_bits[tid])
            w = words[q0 : q0 + b]
            if pt.orientation == "rows":  # [b, R, Fp]: component t·R + j of the tile
                bits = (w[:, None, :, :] >> t[None, :, None, None]) & 1  # [b, 32, R, Fp]
                vals = signed_planes_value(bits).reshape(pt.tile, pt.n_padded)
            else:  # [b, Fp/32, tile]: value f = ft·32·Rf + t·Rf + j
                rf = pt.rows_per_block
                wb = w.reshape(b, -1, rf, pt.tile)  # [b, FT, Rf, tile]
                bits = (
                    wb[:, :, None, :, :] >> t[None, None, :, None, None]
                ) & 1  # [b, FT, 32, Rf, tile]
                vals = signed_planes_value(bits).reshape(pt.n_padded, pt.tile).T
            sc = scales[:, tid * pt.tile : (tid + 1) * pt.tile].T  # [tile, Gp]
            vals = vals * np.repeat(sc, pt.group_size, axis=1)
            comps = np.asarray(pt.kernel_comp)[e, lt * pt.tile : (lt + 1) * pt.tile]
            live = comps < pt.r
            out[e, comps[live]] = vals[live]
    for e in range(pt.num_experts):
        c16 = np.asarray(pt.comp16)[e]
        live = c16 < pt.r
        out[e, c16[live]] = np.asarray(pt.dense16)[e][live].astype(np.float64)
    return out[:, :, : pt.n]


@pytest.mark.parametrize("orientation", ["rows", "lanes"])
@pytest.mark.parametrize("with16", [False, True])
def test_layout_decodes_to_stored_factors(orientation, with16):
    packed, dense = projections(0, with16)
    pt = plane_tiles_from_packed(packed["gate"], E, orientation, TILES)
    np.testing.assert_array_equal(decode_layout(pt), dense["gate"].astype(np.float64))
    assert_position_maps(pt, packed["gate"].bits_per_unit().reshape(E, R))


def test_tile_bits_are_the_largest_member_width_and_planes_are_counted():
    packed, _ = projections(0)
    pt = plane_tiles_from_packed(packed["up"], E, "rows", TILES)
    bits = packed["up"].bits_per_unit().reshape(E, R)
    kc = np.asarray(pt.kernel_comp)
    for e in range(E):
        for lt in range(int(pt.expert_ntiles[e])):
            comps = kc[e, lt * pt.tile : (lt + 1) * pt.tile]
            assert pt.tile_bits[pt.expert_tiles[e, lt]] == bits[e, comps[comps < R]].max()
    assert pt.words.shape[0] == int(np.sum(pt.tile_bits))
    # items of each expert: every (tile, plane) once, in order
    for e in range(E):
        n = int(pt.expert_nsteps[e])
        items = list(zip(pt.step_local[e, :n], pt.step_plane[e, :n], strict=False))
        expect = [
            (lt, p)
            for lt in range(int(pt.expert_ntiles[e]))
            for p in range(int(pt.tile_bits[pt.expert_tiles[e, lt]]))
        ]
        assert items == expect


def test_synthetic_layout_has_the_real_tables_and_bad_tiles_are_refused():
    rng = np.random.default_rng(3)
    bits = rng.choice([0, 1, 2, 3, 4, 8], size=(E, R))
    packed, _ = projections(0)
    real = plane_tiles_from_packed(packed["down"], E, "lanes", TILES)
    synth = synthetic_plane_tiles(
        packed["down"].bits_per_unit().reshape(E, R), F, "lanes", TILES, GS
    )
    for name in ("tile_bits", "expert_tiles", "step_q", "kernel_comp", "comp_pos"):
        np.testing.assert_array_equal(getattr(real, name), getattr(synth, name))
    assert synth.words.shape == real.words.shape and synth.scales.shape == real.scales.shape
    assert abs(random_allocation(4, 512, 2.5).mean() - 2.5) < 0.01
    with pytest.raises(ValueError, match="power of two"):
        synthetic_plane_tiles(bits, F, "rows", TileConfig(tile_rows=96))
    with pytest.raises(ValueError, match="group_size"):
        synthetic_plane_tiles(bits, F, "rows", TILES, group_size=48)
