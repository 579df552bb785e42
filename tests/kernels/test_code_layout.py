"""The GPU code layout decodes back to exactly the stored factors (numpy, independent of the
kernels).

The decoder here follows the documented format (`pallas_kernels.triton.layout`): chunk ``k`` of a
word
is half ``k // ⌊16/b⌋`` at bit ``b·(k mod ⌊16/b⌋)``; group position ``f = k·W_b + w``; value
``2s·(u − (2^b − 1)/2)`` with the layout's scales already holding ``2s``. It is written from the
docstring, not from the packer, and checks the bit arithmetic the kernels' float trick relies on.
"""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.triton import kernels as triton_kernels
from pallas_kernels.triton.layout import CodeConfig, code_tiles_from_packed, synthetic_code_tiles
from tests.kernels.conftest import CODES, GS, E, F, R, assert_position_maps, projections


def decode_code_tiles(ct) -> np.ndarray:
    """Dense [E, r, F] float64 from a CodeTiles, via the documented bit order."""
    out = np.zeros((ct.num_experts, ct.r, ct.n_padded))
    words = np.asarray(ct.words).view(np.uint32).astype(np.int64)
    scales = np.asarray(ct.scales).astype(np.float64)  # [Gp, T·C]
    gp = ct.n_padded // ct.group_size
    for e in range(ct.num_experts):
        for lt in range(int(ct.expert_ntiles[e])):
            tid = int(ct.expert_tiles[e, lt])
            b = int(ct.tile_bits[tid])
            per_half = 16 // b
            wb = -(-ct.group_size // (2 * per_half))
            vals = np.zeros((ct.tile, ct.n_padded))
            for g in range(gp):
                block = words[
                    int(ct.tile_row0[tid]) + g * wb : int(ct.tile_row0[tid]) + (g + 1) * wb
                ]  # [W_b, C]
                for k in range(2 * per_half):
                    shift = 16 * (k // per_half) + b * (k % per_half)
                    u = (block >> shift) & ((1 << b) - 1)
                    for w in range(wb):
                        f = k * wb + w
                        if f < ct.group_size:
                            vals[:, g * ct.group_size + f] = u[w] - (2**b - 1) / 2
            sc = scales[:, tid * ct.tile : (tid + 1) * ct.tile].T  # [C, Gp]
            vals = vals * np.repeat(sc, ct.group_size, axis=1)
            comps = np.asarray(ct.kernel_comp)[e, lt * ct.tile : (lt + 1) * ct.tile]
            live = comps < ct.r
            out[e, comps[live]] = vals[live]
        c16 = np.asarray(ct.comp16)[e]
        out[e, c16[c16 < ct.r]] = np.asarray(ct.dense16)[e][c16 < ct.r].astype(np.float64)
    return out[:, :, : ct.n]


@pytest.mark.parametrize("tile", [CODES.tile, 128])
@pytest.mark.parametrize("with16", [False, True])
def test_code_layout_decodes_to_stored_factors(tile, with16):
    packed, dense = projections(0, with16)
    ct = code_tiles_from_packed(packed["gate"], E, tile)
    np.testing.assert_array_equal(decode_code_tiles(ct), dense["gate"].astype(np.float64))
    assert_position_maps(ct, packed["gate"].bits_per_unit().reshape(E, R))


def test_tiles_are_sorted_by_width_and_width_ranges_cover_them():
    packed, _ = projections(0)
    ct = code_tiles_from_packed(packed["up"], E, CODES.tile)
    bits = packed["up"].bits_per_unit().reshape(E, R)
    for e in range(E):
        n = int(ct.expert_ntiles[e])
        widths = [int(ct.tile_bits[ct.expert_tiles[e, lt]]) for lt in range(n)]
        assert widths == sorted(widths)
        for lt, w in enumerate(widths):  # the tile's width is its widest member's
            comps = np.asarray(ct.kernel_comp)[e, lt * ct.tile : (lt + 1) * ct.tile]
            assert w == bits[e, comps[comps < R]].max()
        ws = np.asarray(ct.width_start[e])
        assert ws[-1] == n and all(
            widths[i] == b for b in range(1, 9) for i in range(ws[b - 1], ws[b])
        )
    assert set(ct.widths) == {
        int(b) for b in np.asarray(ct.tile_bits)[: int(ct.expert_ntiles.sum())]
    }


def test_float_trick_decodes_every_code_exactly():
    # every b-bit value at every chunk position of both halves, through the kernels' decode (jnp)
    import jax.numpy as jnp

    table = triton_kernels.exponent_table()
    for b in range(1, 9):
        per_half = 16 // b
        for k in range(2 * per_half):
            h, j = divmod(k, per_half)
            u = np.arange(2**b, dtype=np.int64)
            words = (u << (16 * h + b * j)).astype(np.uint32).view(np.int32)
            base = (
                jnp.asarray(words)
                if h == 0
                else jnp.asarray(words.view(np.uint32) >> 16).astype(jnp.int32)
            )
            got = triton_kernels.decode_chunk(base, b, j, table[b * j])
            np.testing.assert_array_equal(np.asarray(got), u.astype(np.float32))


def test_synthetic_layout_has_the_real_tables_and_bad_configs_are_refused():
    packed, _ = projections(0)
    real = code_tiles_from_packed(packed["down"], E, CODES.tile)
    synth = synthetic_code_tiles(packed["down"].bits_per_unit().reshape(E, R), F, GS, CODES.tile)
    for name in (
        "tile_bits",
        "tile_row0",
        "expert_tiles",
        "width_start",
        "kernel_comp",
        "comp_pos",
    ):
        np.testing.assert_array_equal(getattr(real, name), getattr(synth, name))
    assert synth.words.shape == real.words.shape and synth.scales.shape == real.scales.shape
    bits = np.random.default_rng(3).choice([0, 1, 2, 3, 4, 8], size=(E, R))
    with pytest.raises(ValueError, match="power of two"):
        synthetic_code_tiles(bits, F, GS, tile=48)
    with pytest.raises(ValueError, match="group_size"):
        synthetic_code_tiles(bits, F, group_size=48, tile=32)
    assert CodeConfig().tile == 128
