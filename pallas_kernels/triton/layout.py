"""GPU kernel layout: b-bit integer codes per expert, decoded by the float-exponent trick.

Why not bit-planes on GPU
-------------------------
`layout.PlaneTiles` (the TPU layout) splits
every ``b``-bit code into ``b`` ±1 planes. A GPU GEMV reading planes unpacks 8 plane values per
byte, and each needs a shift, a mask and an integer-to-float conversion, which runs at a quarter of
the rate of a float op on Hopper. The SASS of that kernel (`bench/triton_sass.py`) showed about 62
instructions per byte of weights, which caps it near 12 % of an H200's copy bandwidth. This layout
stores each component's codes as ``b``-bit integers instead (``b`` = its bit-width) and decodes one
code with two instructions and no conversion:

    f = bitcast_f32((word & (mask << s)) | exponent_bits(2^(23−s)))   # one LOP3
    u = f − 2^(23−s)                                                   # exact: 2^(23−s)·(1 +
    u·2^s/2^23) = 2^(23−s) + u

The code sits at bit ``s`` of the mantissa. With the exponent of ``2^(23−s)`` one mantissa step is
worth 1, so ``f`` is exactly ``2^(23−s) + u``. After one FADD, one FFMA accumulates ``u·a``. That is
3 instructions per code, or about 10 per byte at 2.5 bits. The stored value of a ``b``-bit code
``u`` is ``2s·(u − (2^b − 1)/2)``. The ``2`` is folded into the layout's scales. The offset term
``−(2^b−1)/2·Σa`` is added once per width, from a running sum of the multipliers.

Codes sit in 16-bit halves, so a code never crosses bit 16 and ``s + b ≤ 16 < 23``. A word holds
``2·⌊16/b⌋`` codes: 32 at 1 bit, 16 at 2, 10 at 3, 8 at 4, 4 at 8. Chunk ``k = h·⌊16/b⌋ + j``
of a word is half ``h``, bits ``[b·j, b·j + b)``. The kernel reads half ``h`` as
``word >> 16·h`` (logical shift).

One layout, `CodeTiles`, serves all three projections. Each expert's 1..8-bit components are sorted
by width and cut into *tiles* of ``C`` components (``tile``). As in the plane layout, a tile's width
is that of its widest member: the few boundary tiles are promoted, and their narrower codes are
re-encoded exactly. A tile's components lie on the last axis (``C`` columns). Along the unit axis
``F``, each scale group of ``gs`` positions takes ``W_b = ⌈gs / codes_per_word(b)⌉`` word rows.
Position ``f = k·W_b + w`` of a group is chunk ``k`` of word row ``w``. Slots past ``gs`` are dead
(code 0): 2 of 130 at 3 bits and gs = 128. ``words [N, C]`` stacks the tiles' rows, group by group,
from ``tile_row0``. The kernels read a ``[W_b, C]`` block of one group in two ways:

* gate/up (``g = z·A[e]``, contraction over components): the multiplier ``a = z_c·2s_{c,g}`` is one
  per *column*, so each thread computes a few of them per block and reuses each for every code of
  its words. The codes' outputs are the group's positions ``k·W_b + w``.
* down (``acc = h·B[e]ᵀ``, contraction over ``F``): the multiplier ``h_f`` is one per (chunk, row).
  The columns are the outputs, and the group's scale multiplies the block's partial sums once.

Scales: ``scales [Gp, T·C]`` (= 2·scale), component ``c`` of tile ``t`` in group ``g`` at
``[g, t·C + c]``; 0 for dead components.

16-bit components go to the dense side matrix ``dense16`` as in the plane layout; 0-bit ones are
dropped. The stored checkpoint format is unchanged: this layout is derived at load time.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np

from bitsmoe_jax.method import quantizers as qz
from bitsmoe_jax.method.packing import PackedMatrix
from pallas_kernels.tiles import (
    ExpertTileTables,
    decode_packed,
    dense16_side,
    random_words_and_scales,
    round_up,
    tile_assignment,
)

HALF_BITS = 16
MAX_CODE_BITS = 8


@dataclasses.dataclass(frozen=True)
class CodeConfig:
    """Size of the code layout: ``tile`` components per tile (a power of two, a multiple of 4). A
    larger tile means fewer, longer programs; a smaller one promotes fewer boundary components."""

    tile: int = 128


def codes_per_half(bits: int) -> int:
    return HALF_BITS // int(bits)


def codes_per_word(bits: int) -> int:
    return 2 * codes_per_half(bits)


def chunk_shift(bits: int, k: int) -> int:
    """Bit position of chunk ``k`` in its word (``16·h + b·j``)."""
    h, j = divmod(int(k), codes_per_half(bits))
    return HALF_BITS * h + int(bits) * j


def words_per_group(bits: int, group_size: int) -> int:
    """Word rows one scale group of ``group_size`` unit positions takes in `CodeTiles`."""
    return -(-int(group_size) // codes_per_word(bits))


def pow2_blocks(n: int) -> tuple[tuple[int, int], ...]:
    """``n`` rows as ``(offset, size)`` blocks of descending powers of two (Triton shapes are powers
    of two)."""
    out, off = [], 0
    for p in range(int(n).bit_length() - 1, -1, -1):
        if n & (1 << p):
            out.append((off, 1 << p))
            off += 1 << p
    return tuple(out)


def _pack_chunks(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``u [K, ...]`` (chunk-major, ``K = codes_per_word(bits)``) -> words ``[...]``
    int32."""
    words = np.zeros(u.shape[1:], np.uint32)
    for k in range(u.shape[0]):
        words |= u[k].astype(np.uint32) << np.uint32(chunk_shift(bits, k))
    return words.view(np.int32)


@dataclasses.dataclass(frozen=True)
class CodeTiles(ExpertTileTables):
    """One projection, all experts, in code layout (a pytree; see the module docstring).

    * ``words [N, C] int32`` — tile ``t``'s rows start at ``tile_row0[t]``, ``W_b`` rows per group.
    * ``scales [Gp, T·C] bfloat16`` — 2·scale of component ``c`` of tile ``t`` in group ``g`` at
      ``[g, t·C + c]``.
    * ``tile_bits, tile_row0 [T]``; ``expert_tiles [E, L]`` (padded by repeating the last tile),
      ``expert_ntiles [E]``; ``width_start [E, 9]``: expert ``e``'s tiles of width ``b`` are
      ``[width_start[e, b−1], width_start[e, b])`` (tiles are sorted by width).
    * ``kernel_comp [E, L·C]`` — original component at each kernel position, ``r`` for dead ones;
      ``comp_pos [E, r]`` — kernel position of each component, ``L·C`` (a zero column) for those not
      in the kernel (0- and 16-bit ones).
    * ``dense16 [E, n16, Fp] bfloat16``, ``comp16 [E, n16]`` (``r`` = none) — 16-bit components.

    Static: ``r``, ``n``, ``n_padded``, ``group_size``, ``tile`` (``C``), ``widths``.
    """

    words: np.ndarray | jax.Array
    scales: np.ndarray | jax.Array
    tile_bits: np.ndarray | jax.Array
    tile_row0: np.ndarray | jax.Array
    expert_tiles: np.ndarray | jax.Array
    expert_ntiles: np.ndarray | jax.Array
    width_start: np.ndarray | jax.Array
    kernel_comp: np.ndarray | jax.Array
    comp_pos: np.ndarray | jax.Array
    dense16: np.ndarray | jax.Array
    comp16: np.ndarray | jax.Array
    r: int
    n: int
    n_padded: int
    group_size: int
    tile: int
    widths: tuple[int, ...]

    def expert_bytes(self, e: int) -> int:
        """Bytes of expert ``e``'s tiles (words and scales): what routing a row to it reads."""
        gp = self.n_padded // self.group_size
        tiles = np.asarray(self.expert_tiles)[e, : int(np.asarray(self.expert_ntiles)[e])]
        rows = sum(
            gp * words_per_group(int(b), self.group_size) for b in np.asarray(self.tile_bits)[tiles]
        )
        return rows * self.tile * 4 + tiles.size * gp * self.tile * 2


_FIELDS = [
    "words",
    "scales",
    "tile_bits",
    "tile_row0",
    "expert_tiles",
    "expert_ntiles",
    "width_start",
    "kernel_comp",
    "comp_pos",
    "dense16",
    "comp16",
]
jax.tree_util.register_dataclass(
    CodeTiles,
    data_fields=_FIELDS,
    meta_fields=["r", "n", "n_padded", "group_size", "tile", "widths"],
)


# ------------------------------------------------------------------------------------------ plans
def _check(bits: np.ndarray, group_size: int, tile: int) -> None:
    gs = int(group_size)
    if gs < 1 or gs & (gs - 1):
        raise ValueError(f"the GPU kernels need a power-of-two group_size, got {gs}")
    if tile < 4 or tile & (tile - 1):
        raise ValueError(f"code layout tile must be a power of two ≥ 4, got {tile}")
    if not np.all(np.isin(bits, [*range(MAX_CODE_BITS + 1), 16])):
        raise ValueError("unit bit-widths must be 0..8 or 16")


def _tile_plan(
    bits: np.ndarray, tile: int, group_size: int, gp: int
) -> tuple[list, list, dict[str, np.ndarray]]:
    """Tiles (promoted to their widest member, as in the plane layout) and their index tables."""
    e_count, r = bits.shape
    comps, tbits = tile_assignment(bits, tile)
    ntiles = np.array([len(c) for c in comps], np.int32)
    lmax = max(1, int(ntiles.max()))
    flat_bits = np.array([b for tb in tbits for b in tb] or [1], np.int32)
    rows = np.array([gp * words_per_group(b, group_size) for b in flat_bits], np.int64)
    tile_row0 = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int32)
    first = np.concatenate([[0], np.cumsum(ntiles)[:-1]]).astype(np.int32)
    expert_tiles = np.zeros((e_count, lmax), np.int32)
    kernel_comp = np.full((e_count, lmax * tile), r, np.int32)
    comp_pos = np.full((e_count, r), lmax * tile, np.int32)
    for e in range(e_count):
        if ntiles[e]:
            gids = first[e] + np.arange(ntiles[e])
            expert_tiles[e] = np.concatenate([gids, np.full(lmax - ntiles[e], gids[-1])])
        for lt, c in enumerate(comps[e]):
            pos = lt * tile + np.arange(tile)
            kernel_comp[e, pos[c >= 0]] = c[c >= 0]
            comp_pos[e, c[c >= 0]] = pos[c >= 0]
    width_start = np.zeros((e_count, MAX_CODE_BITS + 1), np.int32)
    for e in range(e_count):
        tb = np.asarray(tbits[e], np.int64)
        width_start[e] = np.searchsorted(tb, np.arange(1, MAX_CODE_BITS + 2), side="left")
    tables = dict(
        tile_bits=flat_bits,
        tile_row0=tile_row0,
        expert_tiles=expert_tiles,
        expert_ntiles=ntiles,
        width_start=width_start,
        kernel_comp=kernel_comp,
        comp_pos=comp_pos,
    )
    return comps, tbits, tables


# ------------------------------------------------------------------------------------------
# builders
def code_tiles_from_packed(pm: PackedMatrix, num_experts: int, tile: int = 128) -> CodeTiles:
    """Derive the down code layout of one projection from its stored `PackedMatrix` (numpy,
    exact)."""
    codes, bits, scales, values16 = _decoded(pm, num_experts)
    r, n, gs = bits.shape[1], int(pm.n), int(pm.group_size)
    _check(bits, gs, tile)
    fp = round_up(n, gs)
    gp = fp // gs
    comps, tbits, tab = _tile_plan(bits, tile, gs, gp)
    words = []
    ntot = max(1, int(tab["expert_ntiles"].sum()))
    sc = np.zeros((gp, ntot * tile), np.float32)
    gi = 0
    for e in range(num_experts):
        for c, b in zip(comps[e], tbits[e], strict=False):
            live = c >= 0
            rows = e * r + c[live]
            u = np.zeros((tile, fp), np.int64)
            u[live, :n] = codes[rows].astype(np.int64) + (1 << (b - 1))
            words.append(_tile_words(u, b, gs))
            s = np.zeros((tile, gp), np.float32)
            s[live, : scales.shape[1]] = 2.0 * scales[rows]
            sc[:, gi * tile : (gi + 1) * tile] = s.T
            gi += 1
    dense16, comp16 = dense16_side(bits, values16, fp)
    return CodeTiles(
        words=np.concatenate(words) if words else np.zeros((1, tile), np.int32),
        scales=sc.astype(ml_dtypes.bfloat16),
        dense16=dense16,
        comp16=comp16,
        r=r,
        n=n,
        n_padded=fp,
        group_size=gs,
        tile=tile,
        widths=tuple(sorted({int(b) for tb in tbits for b in tb})),
        **tab,
    )


def _tile_words(u: np.ndarray, bits: int, gs: int) -> np.ndarray:
    """Unsigned codes ``u [C, Fp]`` of one tile -> its word rows ``[Gp·W_b, C]``."""
    c, fp = u.shape
    wb, cpw = words_per_group(bits, gs), codes_per_word(bits)
    g = u.reshape(c, fp // gs, gs)
    g = np.concatenate(
        [g, np.zeros((c, fp // gs, cpw * wb - gs), g.dtype)], axis=2
    )  # dead slots: code 0
    chunks = g.reshape(c, fp // gs, cpw, wb).transpose(2, 1, 3, 0)  # [k, group, w, c]
    return _pack_chunks(chunks, bits).reshape(-1, c)


def _decoded(pm: PackedMatrix, num_experts: int):
    if pm.num_units % num_experts:
        raise ValueError(
            f"PackedMatrix has {pm.num_units} units, not a multiple of num_experts={num_experts}"
        )
    codes, bits, scales, values16 = decode_packed(pm)
    return codes, bits.reshape(num_experts, -1), scales, values16


def synthetic_code_tiles(
    bits: np.ndarray,
    n: int,
    group_size: int = qz.DEFAULT_GROUP_SIZE,
    tile: int = 128,
    seed: int = 0,
    abstract: bool = False,
) -> CodeTiles:
    """The layout of a real allocation ``bits [E, r]`` (0..8) with random words (benchmarks).

    Bytes read and work per tile are those of a real checkpoint with this allocation; the values are
    noise (scales ~1e-2). ``abstract=True``: ``jax.ShapeDtypeStruct`` words and scales.
    """
    bits = np.asarray(bits, np.int64)
    _check(bits, group_size, tile)
    fp = round_up(n, group_size)
    gp = fp // group_size
    _, tbits, tab = _tile_plan(bits, tile, group_size, gp)
    rows = max(1, int(sum(gp * words_per_group(b, group_size) for tb in tbits for b in tb)))
    ntot = max(1, int(tab["expert_ntiles"].sum()))
    words, scales = random_words_and_scales((rows, tile), (gp, ntot * tile), seed, abstract)
    dense16, comp16 = dense16_side(bits, None, fp)
    return CodeTiles(
        words=words,
        scales=scales,
        dense16=dense16,
        comp16=comp16,
        r=bits.shape[1],
        n=int(n),
        n_padded=fp,
        group_size=int(group_size),
        tile=tile,
        widths=tuple(sorted({int(b) for tb in tbits for b in tb})),
        **tab,
    )
