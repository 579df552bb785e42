"""Kernel layout of one packed projection: per-expert tiles of bit-planes, derived at load time.

Why a second layout
-------------------
The checkpoint's :class:`~bitsmoe_jax.method.packing.PackedMatrix` holds *global* bit-width segments
over all ``E·r``
units of a projection plus one global permutation, and packs 32 consecutive values of a unit per
word. That is the right thing to store (its bit count is tested and it is what the allocator costs),
but inside a kernel a tile must be addressable per expert with one bit-width and must unpack without
lane shuffles. So the stored format is unchanged and this module derives, once per load, the layout
the kernels read:

* **Tiles per expert.** Expert ``e``'s components with 1..8 bits are sorted by bit-width (stable)
  and cut into tiles of ``tile`` components from the widest end; the first (narrowest) tile of an
  expert is padded with *dead* components (scale 0, never gathered). 0-bit components are not stored
  at all (they contribute nothing); 16-bit components (bf16 values) go to a small dense side matrix
  ``dense16`` that the caller multiplies with XLA. Tiles of all experts are numbered globally
  (expert-major).
* **Promotion instead of per-segment padding.** A tile's bit-width ``B`` is the largest bit-width of
  its components; a component with ``b < B`` bits is re-encoded *exactly* at ``B`` bits: its value
  ``(2q+1)·s`` with ``q ∈ [-2^(b-1), 2^(b-1))`` is also a ``B``-bit code (``u = q + 2^(B-1)``). Only
  the (at most 7) boundary tiles of an expert carry extra planes, instead of padding every
  (expert, bit-width) segment to the tile size. ``bytes_read`` reports the overhead.
* **Signed planes.** With ``u = Σ_p 2^p·bit_p`` the value is ``(2u − (2^B − 1))·s = s·Σ_p
  2^p·(2·bit_p − 1)``: every plane is a ±1 matrix with weight ``2^p``. A kernel therefore treats
  each *plane block* as an independent unit of work — ``acc += (x·s·2^p) @ sign_p`` — with no
  per-bit-width decode program and no zero-point correction. Planes of all tiles are stacked in one
  array, ``words[q]`` being plane ``p`` of tile ``i`` for ``q = tile_q0[i] + p``.
* **Word order within a tile (t-major).** A block of ``R`` word rows holds ``32·R`` values along the
  packed axis: bit ``t`` of word row ``j`` is value ``t·R + j``. So ``(words >> t) & 1`` for ``t =
  t0 … t0+k-1`` stacked on a leading axis and reshaped is the contiguous slice of ``k·R`` values —
  no lane relayout on TPU, no register shuffles on GPU. The callers permute activations, not
  weights.

Two orientations, because the packed axis (along a unit) is the output axis of gate/up and the
contraction axis of down:

* ``"rows"`` (gate, up: ``g = z @ A[e]``, ``A[e]`` is ``[r, F]``, units are rows of length ``F``):
  the *components* are the t-major axis. ``words [P, tile/32, Fp]``: word row ``j`` of plane block
  ``q`` at lane ``f`` holds bit ``t`` of component ``t·R + j`` of the tile (``R = tile/32``). A
  kernel gathers ``z`` into the same order (``kernel_comp``), so the unpacked ``[tile, lanes]``
  block multiplies a contiguous ``z`` slice.
* ``"lanes"`` (down: ``acc = h @ B[e]ᵀ``, ``B[e]`` is ``[r_d, F]``, units are rows of length ``F``):
  the *unit positions* are the t-major axis within f-tiles of ``32·rows_per_block`` values, the
  components lie on lanes. ``words [P, Fp/32, tile]``: word row ``ft·Rf + j`` at lane ``c`` holds
  bit ``t`` of value ``f = ft·32·Rf + t·Rf + j`` of component ``c`` of the tile. Unpacking gives
  ``Bᵀ`` rows in natural ``f`` order, so ``h`` needs no permutation; ``acc`` comes out in kernel
  component order and ``comp_pos`` maps it back.

Scales: ``scales [Gp, 1, T·tile]`` bfloat16, ``scales[g, 0, i·tile + c]`` = group-``g`` scale of
component ``c`` of tile ``i`` (0 for dead components and for padded groups). Components sit on the
last axis so that a kernel reads a ``[1, tile]`` row — lane-dense on TPU. ``F`` is padded to ``Fp``
(a multiple of the lane tile and of ``group_size``) with code 0 / scale 0 groups; values of a
partial last group past ``F`` are masked by the callers (gate/up zero ``h`` past ``F``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_dtypes
import numpy as np

from bitsmoe_jax.method import quantizers as qz
from bitsmoe_jax.method.packing import WORD_BITS, PackedMatrix
from pallas_kernels.tiles import (
    ExpertTileTables,
    decode_packed,
    dense16_side,
    random_words_and_scales,
    round_up,
    tile_assignment,
)

ORIENTATIONS = ("rows", "lanes")


@dataclasses.dataclass(frozen=True)
class PlaneTiles(ExpertTileTables):
    """One projection (all experts) in kernel layout; see the module docstring.

    Array fields (pytree leaves):

    * ``words [P, Wr, Wc] int32`` — the plane blocks (``"rows"``: ``[P, tile/32, Fp]``;
      ``"lanes"``: ``[P, Fp/32, tile]``). int32, not uint32: shifts and masks are identical and
      Mosaic converts only signed integers to floats.
    * ``scales [Gp, 1, T·tile] bfloat16``.
    * ``tile_q0 [T]``, ``tile_bits [T]`` — first plane block and bit-width of each tile.
    * ``expert_tiles [E, L]`` — global tile id of expert ``e``'s ``l``-th tile, padded by repeating
      the expert's last tile (tile 0 for an expert with none): a clamped index keeps a TPU pipeline
      from fetching anything new for the padding steps.
    * ``expert_ntiles [E]``.
    * ``step_q, step_tile, step_local, step_plane, step_fblock [E, S]`` and ``expert_nsteps [E]`` —
      the work items of each expert in order, padded like ``expert_tiles``: ``"rows"``: (tile,
      plane) (``S = max_e Σ bits``); ``"lanes"``: (tile, f-block, plane). A TPU grid runs over them.
    * ``kernel_comp [E, L·tile]`` — original component at each kernel position, ``r`` for dead ones.
    * ``comp_pos [E, r]`` — kernel position of each original component, ``L·tile`` (a zero column)
      for components not in the kernel (0- and 16-bit ones).
    * ``dense16 [E, n16, Fp] bfloat16`` and ``comp16 [E, n16]`` (``r`` = none) — 16-bit components.

    Static: ``orientation``, ``r``, ``n`` (unit length F), ``n_padded``, ``group_size``, ``tile``,
    ``rows_per_block`` (word rows per unpack block: ``tile/32`` for rows, ``Rf`` for lanes),
    ``block`` (lanes per output block of ``"rows"``, ``n_block``; unit positions per f-block of
    ``"lanes"``, ``f_block``).
    """

    words: np.ndarray | jax.Array
    scales: np.ndarray | jax.Array
    tile_q0: np.ndarray | jax.Array
    tile_bits: np.ndarray | jax.Array
    expert_tiles: np.ndarray | jax.Array
    expert_ntiles: np.ndarray | jax.Array
    step_q: np.ndarray | jax.Array
    step_tile: np.ndarray | jax.Array
    step_local: np.ndarray | jax.Array
    step_plane: np.ndarray | jax.Array
    step_fblock: np.ndarray | jax.Array
    expert_nsteps: np.ndarray | jax.Array
    kernel_comp: np.ndarray | jax.Array
    comp_pos: np.ndarray | jax.Array
    dense16: np.ndarray | jax.Array
    comp16: np.ndarray | jax.Array
    orientation: str
    r: int
    n: int
    n_padded: int
    group_size: int
    tile: int
    rows_per_block: int
    block: int

    @property
    def max_steps(self) -> int:
        return int(self.step_q.shape[1])

    def expert_bytes(self, e: int) -> int:
        """Bytes of expert ``e``'s tiles (plane words and scales): what routing a row to it
        reads."""
        wbytes = int(np.prod(self.words.shape[1:])) * 4
        sbytes = int(self.scales.shape[0]) * self.tile * 2
        tiles = np.asarray(self.expert_tiles)[e, : int(np.asarray(self.expert_ntiles)[e])]
        return int(np.asarray(self.tile_bits)[tiles].sum()) * wbytes + tiles.size * sbytes


jax.tree_util.register_dataclass(
    PlaneTiles,
    data_fields=[
        "words",
        "scales",
        "tile_q0",
        "tile_bits",
        "expert_tiles",
        "expert_ntiles",
        "step_q",
        "step_tile",
        "step_local",
        "step_plane",
        "step_fblock",
        "expert_nsteps",
        "kernel_comp",
        "comp_pos",
        "dense16",
        "comp16",
    ],
    meta_fields=[
        "orientation",
        "r",
        "n",
        "n_padded",
        "group_size",
        "tile",
        "rows_per_block",
        "block",
    ],
)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes of the kernel layout (powers of two).

    ``tile_rows``: components per tile of gate/up (``"rows"``; the contraction block of one work
    item, ``tile_rows/32`` word rows). ``tile_lanes``: components per tile of down (``"lanes"``; the
    output block). ``n_block``: lanes per output block of gate/up, ``f_block``: unit positions per
    contraction block of down — each the largest power of two in ``[*_min, *]`` that does not pad
    ``F`` beyond a multiple of ``lcm(*_min, group_size)`` (larger blocks mean fewer grid steps on
    TPU). TPU needs ``tile_rows ≥ 256`` (8 word rows), ``f_block_min ≥ 256``, lane blocks multiples
    of 128.
    """

    tile_rows: int = 256
    tile_lanes: int = 128
    n_block: int = 128
    f_block: int = 256
    n_block_min: int = 128
    f_block_min: int = 256

    def check(self, group_size: int) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"TileConfig.{f.name} must be a power of two, got {v}")
        if self.tile_rows % WORD_BITS or self.f_block_min % WORD_BITS:
            raise ValueError(
                f"TileConfig.tile_rows and f_block_min must be multiples of {WORD_BITS}: {self}"
            )
        if self.n_block < self.n_block_min or self.f_block < self.f_block_min:
            raise ValueError(f"TileConfig block maxima below their minima: {self}")
        gs = int(group_size)
        if gs < 1 or gs & (gs - 1):
            raise ValueError(f"the Pallas kernels need a power-of-two group_size, got {gs}")
        if self.f_block_min % gs or self.f_block_min > WORD_BITS * gs:
            raise ValueError(
                f"TileConfig.f_block_min={self.f_block_min} must be a multiple of group_size {gs} "
                "and at most 32·group_size"
                " (a t-slice of f_block/32 values must stay inside one scale group)"
            )
        if self.n_block_min % gs:
            raise ValueError(
                f"TileConfig.n_block_min={self.n_block_min} must be a multiple of group_size {gs}"
            )


def _pack_tile(u: np.ndarray, bits: int, orientation: str, rows_per_block: int) -> np.ndarray:
    """Unsigned codes of one tile ``[tile, Fp]`` -> its ``bits`` plane blocks (int32)."""
    t = np.arange(WORD_BITS, dtype=np.uint32)
    if orientation == "rows":
        r = u.shape[0] // WORD_BITS
        u3 = u.reshape(WORD_BITS, r, u.shape[1])  # [t, j, f]: component t·R + j
        sh = t[:, None, None]
        axis = 0
    else:
        rf = rows_per_block
        fp = u.shape[1]
        u3 = u.T.reshape(fp // (WORD_BITS * rf), WORD_BITS, rf, u.shape[0])  # [ft, t, j, c]
        sh = t[None, :, None, None]
        axis = 1
    planes = []
    for p in range(bits):
        w = np.bitwise_or.reduce(((u3 >> np.uint32(p)) & np.uint32(1)) << sh, axis=axis)
        planes.append(w.reshape(-1, w.shape[-1]))
    return np.stack(planes).view(np.int32)


def _tables(
    comps: list[list[np.ndarray]], tbits: list[list[int]], r: int, tile: int, f_blocks: int
) -> dict[str, np.ndarray]:
    """Index tables shared by real and synthetic layouts (see `PlaneTiles`)."""
    e = len(comps)
    ntiles = np.array([len(c) for c in comps], np.int32)
    lmax = max(1, int(ntiles.max()))
    flat_bits = [b for tb in tbits for b in tb]
    tile_bits = np.array(flat_bits or [1], np.int32)
    tile_q0 = np.concatenate([[0], np.cumsum(tile_bits)[:-1]]).astype(np.int32)
    first = np.concatenate([[0], np.cumsum(ntiles)[:-1]]).astype(np.int32)
    expert_tiles = np.zeros((e, lmax), np.int32)
    nsteps = np.array([f_blocks * sum(tb) for tb in tbits], np.int32)
    smax = max(1, int(nsteps.max()))
    step = {k: np.zeros((e, smax), np.int32) for k in ("q", "tile", "local", "plane", "fblock")}
    kernel_comp = np.full((e, lmax * tile), r, np.int32)
    comp_pos = np.full((e, r), lmax * tile, np.int32)
    for i in range(e):
        gids = first[i] + np.arange(ntiles[i])
        if ntiles[i]:
            expert_tiles[i] = np.concatenate([gids, np.full(lmax - ntiles[i], gids[-1])])
        items = [
            (lt, ft, p)
            for lt in range(ntiles[i])
            for ft in range(f_blocks)
            for p in range(tbits[i][lt])
        ]
        items += [items[-1]] * (smax - len(items)) if items else [(0, 0, 0)] * smax
        for s, (lt, ft, p) in enumerate(items):
            g = first[i] + lt if ntiles[i] else 0
            step["q"][i, s] = tile_q0[g] + p
            step["tile"][i, s] = g
            step["local"][i, s] = lt
            step["plane"][i, s] = p
            step["fblock"][i, s] = ft
        for lt, c in enumerate(comps[i]):
            pos = lt * tile + np.arange(tile)
            kernel_comp[i, pos[c >= 0]] = c[c >= 0]
            comp_pos[i, c[c >= 0]] = pos[c >= 0]
    return dict(
        tile_q0=tile_q0,
        tile_bits=tile_bits,
        expert_tiles=expert_tiles,
        expert_ntiles=ntiles,
        step_q=step["q"],
        step_tile=step["tile"],
        step_local=step["local"],
        step_plane=step["plane"],
        step_fblock=step["fblock"],
        expert_nsteps=nsteps,
        kernel_comp=kernel_comp,
        comp_pos=comp_pos,
    )


def _block(n: int, lo: int, hi: int, group_size: int, fits=lambda b: True) -> tuple[int, int]:
    """(block, n_padded): the largest power-of-two block in [lo, hi] adding no padding beyond
    ``lo``'s."""
    fp = round_up(n, math.lcm(lo, group_size))
    block = lo
    while block * 2 <= hi and fp % (block * 2) == 0 and fits(block * 2):
        block *= 2
    return block, fp


def _geometry(
    orientation: str, cfg: TileConfig, n: int, group_size: int
) -> tuple[int, int, int, int]:
    """(tile, rows_per_block, n_padded, block) for one orientation."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    cfg.check(group_size)
    if orientation == "rows":
        block, fp = _block(n, cfg.n_block_min, cfg.n_block, group_size)
        return cfg.tile_rows, cfg.tile_rows // WORD_BITS, fp, block
    # down: an f-block of Rf = block/32 word rows must keep each t-slice inside one scale group
    block, fp = _block(
        n, cfg.f_block_min, cfg.f_block, group_size, fits=lambda b: b <= WORD_BITS * group_size
    )
    return cfg.tile_lanes, block // WORD_BITS, fp, block


def plane_tiles_from_packed(
    pm: PackedMatrix, num_experts: int, orientation: str, cfg: TileConfig
) -> PlaneTiles:
    """Derive the kernel layout of one projection from its stored `PackedMatrix` (numpy, exact)."""
    k, n, gs = pm.num_units, int(pm.n), int(pm.group_size)
    if k % num_experts:
        raise ValueError(f"PackedMatrix has {k} units, not a multiple of num_experts={num_experts}")
    r = k // num_experts
    tile, rpb, fp, block = _geometry(orientation, cfg, n, gs)
    codes, bits, scales, values16 = decode_packed(pm)
    bits = bits.reshape(num_experts, r)
    comps, tbits = tile_assignment(bits, tile)
    tables = _tables(comps, tbits, r, tile, 1 if orientation == "rows" else fp // block)
    gp = fp // gs
    ntot = int(tables["expert_ntiles"].sum())
    scale_arr = np.zeros((gp, 1, max(ntot, 1) * tile), np.float32)
    words = []
    gi = 0
    for e in range(num_experts):
        for c, b in zip(comps[e], tbits[e], strict=False):
            live = c >= 0
            rows = e * r + c[live]
            u = np.zeros((tile, fp), np.uint32)
            u[live, :n] = (codes[rows].astype(np.int64) + (1 << (b - 1))).astype(np.uint32)
            words.append(_pack_tile(u, b, orientation, rpb))
            sc = np.zeros((tile, gp), np.float32)
            sc[live, : scales.shape[1]] = scales[rows]
            scale_arr[:, 0, gi * tile : (gi + 1) * tile] = sc.T
            gi += 1
    wshape = (tile // WORD_BITS, fp) if orientation == "rows" else (fp // WORD_BITS, tile)
    words_arr = np.concatenate(words) if words else np.zeros((1, *wshape), np.int32)
    dense16, comp16 = dense16_side(bits, values16, fp)
    return PlaneTiles(
        words=words_arr,
        scales=scale_arr.astype(ml_dtypes.bfloat16),
        dense16=dense16,
        comp16=comp16,
        orientation=orientation,
        r=r,
        n=n,
        n_padded=fp,
        group_size=gs,
        tile=tile,
        rows_per_block=rpb,
        block=block,
        **tables,
    )


def synthetic_plane_tiles(
    bits: np.ndarray,
    n: int,
    orientation: str,
    cfg: TileConfig,
    group_size: int = qz.DEFAULT_GROUP_SIZE,
    seed: int = 0,
    abstract: bool = False,
) -> PlaneTiles:
    """A layout with the tables of a real bit allocation ``bits [E, r]`` (0..8 or 16) and random
    words
    (16-bit units get a zero side matrix).

    For benchmarks at shapes too large to quantize here: bytes read and work per tile are exactly
    those of a real checkpoint with this allocation; the values are noise (scales ~1e-2).
    ``abstract=True`` gives ``jax.ShapeDtypeStruct`` words and scales (lowering tests allocate
    nothing).
    """
    bits = np.asarray(bits, np.int64)
    if not np.all(np.isin(bits, [*range(9), 16])):
        raise ValueError("unit bit-widths must be 0..8 or 16")
    r = bits.shape[1]
    tile, rpb, fp, block = _geometry(orientation, cfg, n, group_size)
    comps, tbits = tile_assignment(bits, tile)
    tables = _tables(comps, tbits, r, tile, 1 if orientation == "rows" else fp // block)
    planes = int(tables["tile_bits"].sum()) if tables["expert_ntiles"].sum() else 1
    wshape = (
        (planes, tile // WORD_BITS, fp)
        if orientation == "rows"
        else (planes, fp // WORD_BITS, tile)
    )
    ntot = max(int(tables["expert_ntiles"].sum()), 1)
    sshape = (fp // group_size, 1, ntot * tile)
    words, scales = random_words_and_scales(wshape, sshape, seed, abstract)
    dense16, comp16 = dense16_side(bits, None, fp)
    return PlaneTiles(
        words=words,
        scales=scales,
        dense16=dense16,
        comp16=comp16,
        orientation=orientation,
        r=r,
        n=int(n),
        n_padded=fp,
        group_size=int(group_size),
        tile=tile,
        rows_per_block=rpb,
        block=block,
        **tables,
    )
