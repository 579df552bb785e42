"""Shared tiny quantized projections for the kernel tests.

Eight experts so that every bit-width of {0, 1, 2, 3, 4, 8} owns a whole expert (uniform widths)
and two experts mix all of them (boundary tiles are promoted); ``r`` and ``F`` are not multiples of
the tile sizes (partial tiles, padded unit length) and ``F`` not of the group size (ragged group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method.packing import PackedMatrix, dequantize_packed, pack_segments
from pallas_kernels.api import ExpertKernels, build_expert_kernels
from pallas_kernels.mosaic_tpu.layout import TileConfig
from pallas_kernels.triton.layout import CodeConfig

E, R, F, GS = 8, 96, 200, 32
BIT_SET = (0, 1, 2, 3, 4, 8)
# small tiles: interpret mode does not enforce TPU tiling (the lowering tests use the real ones)
TILES = TileConfig(
    tile_rows=64, tile_lanes=32, n_block=64, f_block=64, n_block_min=32, f_block_min=32
)
CODES = CodeConfig(
    tile=32
)  # GPU family: 3 tiles per uniform expert, promoted boundary tiles in the mixed ones


def allocation(rng: np.random.Generator) -> np.ndarray:
    """[E, R] bits: experts 0..5 uniform at each width of BIT_SET (order shuffled), 6..7 random
    mixes."""
    bits = np.empty((E, R), np.int64)
    for e, b in enumerate(rng.permutation(BIT_SET)):
        bits[e] = b
    bits[6:] = rng.choice(BIT_SET, size=(2, R))
    return bits


@functools.cache
def projections(
    seed: int = 0, with16: bool = False, sparse: bool = False, rank: int = R, group_size: int = GS
) -> tuple[dict[str, PackedMatrix], dict[str, np.ndarray]]:
    """Packed gate/up/down factors ([E·rank, F] units) and their dequantized [E, rank, F] float32
    references.

    ``sparse``: half of every expert's units at 0 bits (fewer tiles per expert than the dense mix).
    ``rank``: components per expert (a layer that kept fewer than ``R``). ``group_size``: units per
    scale group (at 128, the default of the quantizer, a 3-bit group's last word row has dead
    slots)."""
    rng = np.random.default_rng(seed)
    packed, dense = {}, {}
    for p in ("gate", "up", "down"):
        units = (
            rng.standard_normal((E * rank, F)) * rng.uniform(0.2, 2.0, size=(E * rank, 1))
        ).astype(np.float32)
        bits = allocation(rng)[:, :rank]
        if sparse:
            bits[:, rng.permutation(rank)[: rank // 2]] = 0
        bits = bits.reshape(-1)
        if with16:
            bits[rng.choice(bits.size, size=7, replace=False)] = 16
        packed[p] = pack_segments(units, bits, group_size)
        dense[p] = np.asarray(dequantize_packed(packed[p])).reshape(E, rank, F)
    return packed, dense


def assert_position_maps(layout, bits: np.ndarray) -> None:
    """Every 1..8-bit component has a kernel position that maps back to it; no other one has."""
    kc, pos = np.asarray(layout.kernel_comp), np.asarray(layout.comp_pos)
    for e in range(kc.shape[0]):
        live = pos[e] < kc.shape[1]
        np.testing.assert_array_equal(kc[e, pos[e, live]], np.flatnonzero(live))
    np.testing.assert_array_equal(pos < kc.shape[1], (bits >= 1) & (bits <= 8))


def assert_matches_reference(got, zg, zu, sizes, dense, rtol: float = 1e-4) -> None:
    """``got`` against `reference.swiglu_experts_reference` on the dequantized factors ``dense``
    (gate, up, down): the largest error at most ``rtol`` of the reference's largest magnitude."""
    import jax.numpy as jnp

    from pallas_kernels.reference import swiglu_experts_reference

    want = swiglu_experts_reference(zg.astype(jnp.float32), zu.astype(jnp.float32), sizes, *dense)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=rtol * scale)


M = 24  # rows (tokens x top-k) of the kernel tests
TILE_SIZES = {"mosaic_tpu": TILES, "triton": CODES}  # the kernel backends' small test tiles


@functools.cache
def kernels(with16: bool, backend: str) -> tuple[ExpertKernels, tuple[np.ndarray, ...]]:
    packed, dense = projections(0, with16)
    kern = build_expert_kernels(packed, E, backend, TILE_SIZES.get(backend))
    return jax.tree.map(jnp.asarray, kern), tuple(dense[p] for p in ("gate", "up", "down"))


def inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((M, R)), dtype) for _ in range(2))
