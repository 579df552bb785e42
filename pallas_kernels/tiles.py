"""What both kernel layouts share: per-expert tile tables, the tiling of an expert's components by
bit-width, decoding the stored format, the 16-bit side path, and synthetic inputs for benches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bitsmoe_jax.method.packing import PackedMatrix, unpack_bitplanes_jnp


class ExpertTileTables:
    """What both kernel layouts (`mosaic_tpu.layout.PlaneTiles`, `triton.layout.CodeTiles`) answer
    the same way."""

    @property
    def num_experts(self) -> int:
        return int(self.expert_ntiles.shape[0])

    @property
    def max_tiles(self) -> int:
        return int(self.expert_tiles.shape[1])

    @property
    def has_dense16(self) -> bool:
        return int(self.dense16.shape[1]) > 0

    def bytes_read(self) -> dict[str, int]:
        """Bytes a forward may read per projection, all experts: words, scales, 16-bit side
        matrix."""

        def size(a):
            return int(np.prod(a.shape))

        return {
            "words": size(self.words) * 4,
            "scales": size(self.scales) * 2,
            "dense16": size(self.dense16) * 2,
        }


def decode_packed(pm: PackedMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored format -> (codes int8 [K, n], bits [K], scales float32 [K, G], values16 float32 [K,
    n]).

    Original unit order. ``codes`` are the signed codes of 1..8-bit units (0 elsewhere),
    ``values16`` the bf16 values of 16-bit units (0 elsewhere).
    """
    k, n, gs = pm.num_units, int(pm.n), int(pm.group_size)
    ng = -(-n // gs)
    perm = np.asarray(pm.perm)
    codes = np.zeros((k, n), np.int8)
    scales = np.zeros((k, ng), np.float32)
    values16 = np.zeros((k, n), np.float32)
    bits = np.zeros(k, np.int64)
    start = 0
    for i, (b, size) in enumerate(zip(pm.seg_bits, pm.seg_sizes, strict=False)):
        idx = perm[start : start + size]
        start += size
        bits[idx] = b
        if b == 16:
            values16[idx] = np.asarray(pm.payload[i]).astype(np.float32)
        elif b > 0:
            # jnp (XLA, on the default device): several times faster than the numpy unpacker at
            # model sizes
            codes[idx] = np.asarray(unpack_bitplanes_jnp(jnp.asarray(pm.payload[i]), b, n)).astype(
                np.int8
            )
            scales[idx] = np.asarray(pm.scales[i]).astype(np.float32)
    return codes, bits, scales, values16


def round_up(x: int, m: int) -> int:
    return -(-int(x) // int(m)) * int(m)


def tile_assignment(bits: np.ndarray, tile: int) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """Per expert: its tiles (component index arrays, ``-1`` = dead) and their bit-widths.

    Components sorted by width are cut into full tiles *from the widest end*, so the one partial
    tile holds the narrowest components. That cut is optimal for any tile cost that grows with the
    tile's width (here bits per position): the cheapest cover of the first ``i`` sorted components
    never costs more than that of ``i + 1``, so the last tile is best taken full. Cutting from the
    narrow end instead left a partial tile of the widest (often 8-bit) components, mostly dead
    slots: +15.7 % vs +8.7 % bytes over stored for a 2.5-bit Mixtral layer with 128-component code
    tiles."""
    comps, tbits = [], []
    for b_e in bits:
        live = np.flatnonzero((b_e >= 1) & (b_e <= 8))
        order = live[np.argsort(b_e[live], kind="stable")]
        nt = -(-order.size // tile)
        padded = np.full(nt * tile, -1, np.int64)
        padded[nt * tile - order.size :] = order  # dead slots open the first (narrowest) tile
        tiles = [padded[i * tile : (i + 1) * tile] for i in range(nt)]
        comps.append(tiles)
        tbits.append([int(b_e[t[t >= 0]].max()) for t in tiles])
    return comps, tbits


def dense16_side(
    bits: np.ndarray, values16: np.ndarray | None, fp: int
) -> tuple[np.ndarray, np.ndarray]:
    """The 16-bit components of every expert: ``dense16 [E, n16, Fp]`` bf16 (zeros where
    ``values16`` is None: synthetic layouts) and ``comp16 [E, n16]`` (``r`` = none)."""
    e_count, r = bits.shape
    is16 = bits == 16
    n16 = int(is16.sum(axis=1).max()) if is16.any() else 0
    dense16 = np.zeros((e_count, n16, fp), np.float32)
    comp16 = np.full((e_count, n16), r, np.int32)
    for e in range(e_count):
        idx = np.flatnonzero(is16[e])
        comp16[e, : idx.size] = idx
        if values16 is not None:
            dense16[e, : idx.size, : values16.shape[1]] = values16[e * r + idx]
    return dense16.astype(ml_dtypes.bfloat16), comp16


def random_words_and_scales(wshape: tuple, sshape: tuple, seed: int, abstract: bool):
    """Random int32 words and bf16 scales (~1e-2) of synthetic layouts, or their abstract shapes."""
    if abstract:
        return jax.ShapeDtypeStruct(wshape, np.int32), jax.ShapeDtypeStruct(
            sshape, ml_dtypes.bfloat16
        )
    rng = np.random.default_rng(seed)
    words = rng.integers(
        np.iinfo(np.int32).min, np.iinfo(np.int32).max, size=wshape, dtype=np.int32
    )
    return words, (rng.uniform(0.5, 1.5, size=sshape) * 1e-2).astype(ml_dtypes.bfloat16)


def random_allocation(num_experts: int, r: int, mean_bits: float, seed: int = 0) -> np.ndarray:
    """Random bit-widths from {0,1,2,3,4,8} per (expert, component) with the requested mean (±0.01).

    Draws from a two-point mix around the mean plus a spread of other widths, then fixes the mean by
    moving single units one step; used only by benchmarks ("synthetic random allocations").
    """
    choices = np.array([0, 1, 2, 3, 4, 8])
    rng = np.random.default_rng(seed)
    lo = choices[choices <= mean_bits].max()
    hi = choices[choices > mean_bits].min() if mean_bits < 8 else 8
    frac = 0.0 if hi == lo else (mean_bits - lo) / (hi - lo)
    b = np.where(rng.random((num_experts, r)) < frac, hi, lo)
    # a spread: 10% of units anywhere in the set, then restore the mean by moving units one step
    spread = rng.random((num_experts, r)) < 0.1
    b[spread] = rng.choice(choices, size=int(spread.sum()))
    flat = b.reshape(-1)
    target = mean_bits * flat.size
    for _ in range(64):
        deficit = target - flat.sum()
        if abs(deficit) <= 0.005 * flat.size:
            break
        pos = np.searchsorted(choices, flat)
        movable = np.flatnonzero(pos < len(choices) - 1) if deficit > 0 else np.flatnonzero(pos > 0)
        pick = rng.choice(
            movable, size=min(movable.size, max(1, int(abs(deficit) // 4))), replace=False
        )
        flat[pick] = choices[pos[pick] + (1 if deficit > 0 else -1)]
    return flat.reshape(num_experts, r)
