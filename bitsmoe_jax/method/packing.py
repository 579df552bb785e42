"""Bit-plane packing of quantized units and the per-matrix packed format.

Bit-plane layout
----------------
Signed codes ``q`` of bit-width ``b`` (1..8, the convention of :mod:`quantizers`:
``q ∈ [-2**(b-1), 2**(b-1)-1]``, value ``(2q+1)·scale``) are first offset to unsigned
``u = q + 2**(b-1) ∈ [0, 2**b)``. For ``b = 1`` that makes ``u`` the sign bit, 1 for
``x >= 0`` and 0 for ``x < 0``. A unit of ``n`` values is zero-padded (in ``u``) to a multiple of
32 and cut into blocks of 32 consecutive values; block ``k`` becomes ``b`` uint32 words, word
``p`` holding bit ``p`` of the 32 values, value ``i`` of the block in bit ``i`` of the word.

The packed array of a unit is the flat sequence ``[block 0: plane 0 … plane b-1, block 1: …]``,
i.e. shape ``[..., ceil(n/32) * b]`` with word index ``k * b + p`` — reshape to
``[..., ceil(n/32), b]`` to address (block, plane). Why bit-planes: every ``b`` (3, 5, 6, 7
included) packs with no value straddling a word, and unpacking value ``i`` of plane ``p`` is one
shift and mask, the same instruction stream for every bit-width — what a Pallas/XLA kernel wants.

Packed matrix
-------------
:func:`pack_segments` stores the ``K`` units of one (expert, projection) factor: units are ordered
by bit-width (stable), each run of equal bit-width is a *segment* with its packed words and its
bf16 group scales (or bf16 values for 16-bit units; nothing for 0-bit units), and the permutation
back to the original order is kept. :func:`dequantize_packed` is jnp and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bitsmoe_jax.method import quantizers as qz

WORD_BITS = 32


def _check_pack_bits(bits: int) -> int:
    bits = int(bits)
    if bits not in qz.INT_BITS:
        raise ValueError(f"bit-plane packing handles bits in {qz.INT_BITS}, got {bits}")
    return bits


def num_words(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits: ``ceil(n/32) * bits``."""
    return -(-int(n) // WORD_BITS) * _check_pack_bits(bits)


def pack_bitplanes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed codes ``[..., n]`` into uint32 bit-plane words ``[..., ceil(n/32) * bits]``.

    Raises ``ValueError`` when a code lies outside ``[-2**(b-1), 2**(b-1)-1]`` — packing would
    otherwise silently wrap it.
    """
    bits = _check_pack_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    lo, hi = qz.code_range(bits)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(
            f"codes outside [{lo}, {hi}] for bits={bits}: min {codes.min()}, max {codes.max()}"
        )
    lead, n = codes.shape[:-1], codes.shape[-1]
    nb = -(-n // WORD_BITS)
    u = (codes.astype(np.int16) - lo).astype(
        np.uint8
    )  # in range (checked): 0 .. 2**b - 1 fits a byte
    if nb * WORD_BITS != n:
        u = np.pad(u, [(0, 0)] * len(lead) + [(0, nb * WORD_BITS - n)])
    u = u.reshape(*lead, nb, WORD_BITS)
    words = np.empty((*lead, nb, bits), np.uint32)
    for p in range(bits):
        # packbits(little) puts value i of a block in bit i of 4 bytes; read little-endian they are
        # the plane's word. 10-20x faster than shifting and OR-reducing uint32 planes.
        plane = np.packbits((u >> p) & 1, axis=-1, bitorder="little")  # [..., nb, 4] uint8
        words[..., p] = plane.view("<u4")[..., 0]
    return words.reshape(*lead, nb * bits)


def unpack_bitplanes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bitplanes` (numpy): signed int32 codes ``[..., n]``."""
    bits = _check_pack_bits(bits)
    words = np.asarray(words, dtype=np.uint32)
    lead = words.shape[:-1]
    nb = -(-int(n) // WORD_BITS)
    if words.shape[-1] != nb * bits:
        raise ValueError(
            f"expected {nb * bits} words for n={n}, bits={bits}; got {words.shape[-1]}"
        )
    w = np.ascontiguousarray(words.reshape(*lead, nb, bits).astype("<u4"))
    u = np.zeros((*lead, nb, WORD_BITS), np.int32)
    for p in range(bits):
        plane = np.unpackbits(
            w[..., p : p + 1].view(np.uint8), axis=-1, bitorder="little"
        )  # [..., nb, 32]
        u |= plane.astype(np.int32) << p
    u = u.reshape(*lead, nb * WORD_BITS)[..., :n]
    return u + np.int32(qz.code_range(bits)[0])


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack_bitplanes_jnp(words: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bitplanes` in jnp (jitted; ``bits`` and ``n`` are static)."""
    bits = _check_pack_bits(bits)
    words = jnp.asarray(words, dtype=jnp.uint32)
    lead = words.shape[:-1]
    nb = -(-int(n) // WORD_BITS)
    if words.shape[-1] != nb * bits:
        raise ValueError(
            f"expected {nb * bits} words for n={n}, bits={bits}; got {words.shape[-1]}"
        )
    w = words.reshape(*lead, nb, 1, bits)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)[:, None]
    planes = (w >> shifts) & jnp.uint32(1)
    u = jnp.sum(planes << jnp.arange(bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    u = u.reshape(*lead, nb * WORD_BITS)[..., :n]
    return u.astype(jnp.int32) + jnp.int32(qz.code_range(bits)[0])


def unit_bits(perm: Any, seg_bits: Sequence[int], seg_sizes: Sequence[int]) -> np.ndarray:
    """Bit-width of every unit in the original order, from a `PackedMatrix`'s permutation and
    segments (only these are needed: a writer can count a layer's rows without its payload)."""
    stored = np.repeat(np.asarray(seg_bits, np.int64), np.asarray(seg_sizes, np.int64))
    out = np.empty(len(stored), np.int64)
    out[np.asarray(perm)] = stored
    return out


def permutation_bits(k: int) -> int:
    """Bits to store a permutation of ``k`` entries: ``k * ceil(log2 k)`` (0 for ``k <= 1``)."""
    k = int(k)
    return k * math.ceil(math.log2(k)) if k > 1 else 0


@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """The ``K`` quantized units of one factor matrix, grouped into bit-width segments.

    Array fields (pytree leaves; numpy on the host, jax arrays once moved to a device):

    * ``perm [K] int32``: ``perm[i]`` is the original index of the ``i``-th stored unit
      (stored order = segments concatenated in ``seg_bits`` order).
    * ``payload``: one array per segment — uint32 bit-plane words ``[k_s, ceil(n/32)*b]`` for
      ``b`` in 1..8, bfloat16 values ``[k_s, n]`` for ``b = 16``, an empty uint32 ``[k_s, 0]``
      for ``b = 0``.
    * ``scales``: one bfloat16 array per segment, ``[k_s, ceil(n/group_size)]`` for ``b`` in 1..8,
      ``[k_s, 0]`` otherwise.

    Static metadata (pytree aux data; part of the format, not of the bit count): ``n``,
    ``group_size``, ``seg_bits`` (ascending) and ``seg_sizes``.

    Registered as a JAX pytree, so a ``PackedMatrix`` can be passed through ``jax.jit``.
    """

    perm: np.ndarray | jax.Array
    payload: tuple
    scales: tuple
    n: int
    group_size: int
    seg_bits: tuple[int, ...]
    seg_sizes: tuple[int, ...]

    @property
    def num_units(self) -> int:
        return int(sum(self.seg_sizes))

    def bits_per_unit(self) -> np.ndarray:
        """Bit-width of every unit, in the original order."""
        return unit_bits(self.perm, self.seg_bits, self.seg_sizes)

    def stored_bits(self) -> int:
        """Every stored bit, measured from the arrays themselves.

        Payload words (32 bits each) or bf16 values (16 each), bf16 scales (16 each) and the
        permutation at ``ceil(log2 K)`` bits per entry (its int32 container is an in-memory
        convenience; the count is what a tight encoding needs). No per-component scalars exist in
        this format. The static metadata (``n``, ``group_size``, at most 10 segment bit-widths and
        sizes) is not counted. Equals ``Σ_units quantizers.stored_bits(n, b, group_size) +
        permutation_bits(K)``.
        """
        total = 0
        for arr in self.payload:
            total += int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize * 8
        for arr in self.scales:
            total += int(np.prod(arr.shape)) * 16
        return total + permutation_bits(self.num_units)


jax.tree_util.register_dataclass(
    PackedMatrix,
    data_fields=["perm", "payload", "scales"],
    meta_fields=["n", "group_size", "seg_bits", "seg_sizes"],
)


CHUNK_ELEMENTS = 1 << 17  # units quantized per jitted call: bounds the scale search's intermediates


def _chunk_rows(count: int, n: int) -> int:
    """Rows per quantization call: a power of two (one compiled program per bucket, not per layer —
    kept-unit counts differ from layer to layer), at most `CHUNK_ELEMENTS` elements unless one row
    is longer. Chunks never change the result: every row is quantized on its own."""
    cap = max(1, CHUNK_ELEMENTS // max(n, 1))
    cap = 1 << (cap.bit_length() - 1)
    return min(1 << max(count - 1, 0).bit_length(), cap)


def _quantize_rows(
    units: np.ndarray,
    rows_sel: np.ndarray,
    bpu: np.ndarray,
    rows: int,
    group_size: int,
    w_full: np.ndarray | None,
    scales: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of the units `rows_sel`, quantized in one call padded to `rows` rows
    (zeros)."""
    m, n = rows_sel.size, units.shape[1]
    x = np.zeros((rows, n), np.float32)
    x[:m] = units[rows_sel]
    b = np.ones(rows, np.int64)
    b[:m] = bpu[rows_sel]
    if scales is None:
        w = None
        if w_full is not None:
            w = np.zeros((rows, n), np.float32)
            w[:m] = w_full[rows_sel]
        c, sc = qz.quantize_codes_mixed(x, b, group_size, w)
    else:
        sc = np.zeros((rows, qz.num_groups(n, min(group_size, n))), np.float32)
        sc[:m] = np.asarray(scales, np.float32)[rows_sel]
        c = qz.codes_for_scales(x, sc, b, group_size)
    return np.asarray(c)[:m], np.asarray(sc)[:m]


def _checked_units(
    units: np.ndarray, bits_per_unit: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    units = np.asarray(units, np.float32)
    if units.ndim != 2:
        raise ValueError(f"units must be [K, n], got shape {units.shape}")
    bpu = np.asarray(bits_per_unit, np.int64).reshape(-1)
    if bpu.shape[0] != units.shape[0]:
        raise ValueError(f"bits_per_unit has {bpu.shape[0]} entries for {units.shape[0]} units")
    bad = sorted(set(bpu.tolist()) - set(qz.SUPPORTED_BITS))
    if bad:
        raise ValueError(f"unsupported bit-widths {bad}; allowed {qz.SUPPORTED_BITS}")
    return units, bpu


def quantize_units(
    units: np.ndarray,
    bits_per_unit: Sequence[int] | np.ndarray,
    group_size: int = qz.DEFAULT_GROUP_SIZE,
    weights: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (int8 ``[K, n]``) and group scales (float32 ``[K, n_groups]``) of the 1..8-bit
    units.

    The quantization half of `pack_segments` (same arguments); 0- and 16-bit units, and with
    ``rows`` every unit not listed, get zeros. Every unit is quantized on its own, so a
    multi-process run can give each process its experts' rows and all-gather the results.
    """
    units, bpu = _checked_units(units, bits_per_unit)
    k, n = units.shape
    group_size = int(group_size)
    w_full = (
        None if weights is None else np.broadcast_to(np.asarray(weights, np.float32), units.shape)
    )
    codes_all = np.zeros((k, n), np.int8)  # codes of 1..8 bits fit a byte
    scales_all = np.zeros((k, qz.num_groups(n, min(group_size, n)) if n else 0), np.float32)
    is_int = (bpu >= 1) & (bpu <= 8)
    if rows is not None:
        is_int &= np.isin(np.arange(k), rows)
    sel = np.flatnonzero(is_int)
    if sel.size:
        # One program for every width (bit-width per unit is a traced value), in row chunks of
        # bounded size.
        chunk = _chunk_rows(sel.size, n)
        for lo in range(0, sel.size, chunk):
            rows_sel = sel[lo : lo + chunk]
            c, sc = _quantize_rows(units, rows_sel, bpu, chunk, group_size, w_full, scales)
            codes_all[rows_sel] = c
            scales_all[rows_sel] = sc
    return codes_all, scales_all


def pack_segments(
    units: np.ndarray,
    bits_per_unit: Sequence[int] | np.ndarray,
    group_size: int = qz.DEFAULT_GROUP_SIZE,
    weights: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    quantized: tuple[np.ndarray, np.ndarray] | None = None,
) -> PackedMatrix:
    """Quantize and pack ``units [K, n]`` with one bit-width each (``bits_per_unit [K]``).

    ``weights`` (``[K, n]`` or broadcastable, ``>= 0``) must be the ones the loss coefficients were
    computed with, so that the stored scales are the costed ones. ``scales`` (``[K, n_groups]``,
    bf16-representable; entries of 0/16-bit units ignored) skips the scale search: the codes are
    then the nearest on those scales — for error feedback that fixed each group's scale earlier.
    ``quantized``: the (codes, scales) `quantize_units` returned for these arguments, computed
    elsewhere (sharded over processes); only the packing is then done here.
    """
    units, bpu = _checked_units(units, bits_per_unit)
    group_size = int(group_size)
    codes_all, scales_all = (
        quantized
        if quantized is not None
        else quantize_units(units, bpu, group_size, weights, scales)
    )
    return assemble_packed(
        [pack_rows(units, bpu, codes_all, scales_all, group_size)], units.shape[1], group_size
    )


def _join(parts: Sequence[PackedRows], field: str, b: int, consume: bool) -> np.ndarray:
    """np.concatenate of the parts' width-`b` arrays of `field`, dropping each once copied when
    `consume`."""
    arrays = [getattr(p, field) for p in parts if b in getattr(p, field)]
    if not consume:
        return np.concatenate([a[b] for a in arrays])
    first = arrays[0][b]
    out = np.empty((sum(len(a[b]) for a in arrays), *first.shape[1:]), first.dtype)
    start = 0
    for a in arrays:
        rows = a.pop(b)
        out[start : start + len(rows)] = rows
        start += len(rows)
    return out


@dataclasses.dataclass
class PackedRows:
    """Some consecutive units packed, by bit-width: what `assemble_packed` joins into a
    `PackedMatrix` (a streamed layer packs each chunk of experts as it is rounded)."""

    bits: np.ndarray  # [k] bit-width of each unit, in unit order
    payload: dict[int, np.ndarray]  # b -> the rows with b bits, in unit order
    scales: dict[int, np.ndarray]


def pack_rows(
    units: np.ndarray | None,
    bpu: np.ndarray,
    codes: np.ndarray,
    scales: np.ndarray,
    group_size: int,
) -> PackedRows:
    """Pack units `[k, n]` from their codes and scales (`quantize_units`); 16-bit units are stored
    as their bf16 values (`units` may be None when there are none), 0-bit ones as nothing. Every
    row is packed on its own."""
    payload, out_scales = {}, {}
    for b in np.unique(bpu).tolist():
        idx = np.flatnonzero(bpu == b)
        size = idx.size
        if b == 0:
            payload[b] = np.zeros((size, 0), np.uint32)
            out_scales[b] = np.zeros((size, 0), ml_dtypes.bfloat16)
        elif b == 16:
            vals, _ = qz.quantize_codes(units[idx], 16, group_size)
            payload[b] = np.asarray(vals).astype(np.uint16).view(ml_dtypes.bfloat16)
            out_scales[b] = np.zeros((size, 0), ml_dtypes.bfloat16)
        else:
            payload[b] = pack_bitplanes(codes[idx], b)
            # Scales are bf16-representable by construction; the cast is exact.
            out_scales[b] = scales[idx].astype(ml_dtypes.bfloat16)
    return PackedRows(np.asarray(bpu, np.int64), payload, out_scales)


def assemble_packed(
    parts: Sequence[PackedRows], n: int, group_size: int, consume: bool = False
) -> PackedMatrix:
    """One `PackedMatrix` of the units of `parts` in order: segments by ascending bit-width, each
    the rows of that width in unit order (`perm` the stable sort of the widths).

    `consume`: empty each part's rows as they are copied, so the joined layer is never held twice
    (a streamed layer's packed codes are 1/8 of its bf16 experts at 2 bits: 0.7 GiB at 64
    DeepSeek-V3 experts)."""
    bpu = np.concatenate([p.bits for p in parts]) if parts else np.zeros(0, np.int64)
    perm = np.argsort(bpu, kind="stable")
    seg_bits, seg_sizes = np.unique(bpu[perm], return_counts=True)
    payload, scales = [], []
    for b in seg_bits.tolist():
        payload.append(_join(parts, "payload", b, consume))
        scales.append(_join(parts, "scales", b, consume))
    return PackedMatrix(
        perm=perm.astype(np.int32),
        payload=tuple(payload),
        scales=tuple(scales),
        n=int(n),
        group_size=int(group_size),
        seg_bits=tuple(int(b) for b in seg_bits),
        seg_sizes=tuple(int(c) for c in seg_sizes),
    )


def as_rows(pm: PackedMatrix) -> PackedRows:
    """A `PackedMatrix`'s units as `PackedRows` (its segments are already the rows of each width
    in unit order), so that `assemble_packed` can join several matrices' units: the packed shards
    of consecutive experts written by the processes of a run join into the layer's matrix, the
    same bytes as if one process had packed every expert (`merge_shards`)."""
    return PackedRows(
        pm.bits_per_unit(),
        {b: np.asarray(a) for b, a in zip(pm.seg_bits, pm.payload, strict=True)},
        {b: np.asarray(a) for b, a in zip(pm.seg_bits, pm.scales, strict=True)},
    )


def unit_rows(
    pm: PackedMatrix, start: int, stop: int, bits: np.ndarray | None = None
) -> PackedRows:
    """The packed rows of units [start, stop) of `pm`, by width, in unit order: a slice of each
    segment (a segment holds the rows of its width in unit order, so the units of a range are
    consecutive rows of it). `bits`: `pm.bits_per_unit()`, if already computed. Joined again by
    `assemble_packed` (the written checkpoint stores a layer's factors as such slices, a group of
    experts each: `serve.quantized_checkpoint`)."""
    bpu = pm.bits_per_unit() if bits is None else bits
    payload, scales = {}, {}
    for i, b in enumerate(pm.seg_bits):
        lo, hi = np.searchsorted(np.flatnonzero(bpu == b), [start, stop])
        if hi > lo:
            payload[b] = np.asarray(pm.payload[i][lo:hi])
            scales[b] = np.asarray(pm.scales[i][lo:hi])
    return PackedRows(bpu[start:stop], payload, scales)


def merge_shards(shards: Sequence[PackedMatrix]) -> PackedMatrix:
    """One `PackedMatrix` of the units of `shards` in order (each the packed units of some
    consecutive experts)."""
    if not shards:
        raise ValueError("no packed shards to merge")
    return assemble_packed([as_rows(s) for s in shards], shards[0].n, shards[0].group_size)


def _dequantize_segment(pm: PackedMatrix, i: int) -> jax.Array:
    b, size, n = pm.seg_bits[i], pm.seg_sizes[i], pm.n
    if b == 0:
        return jnp.zeros((size, n), jnp.float32)
    if b == 16:
        return jnp.asarray(pm.payload[i]).astype(jnp.float32)
    codes = unpack_bitplanes_jnp(pm.payload[i], b, n)
    return qz.dequantize_codes(
        codes, jnp.asarray(pm.scales[i]).astype(jnp.float32), b, pm.group_size
    )


def _dequantize(pm: PackedMatrix) -> jax.Array:
    parts = [_dequantize_segment(pm, i) for i in range(len(pm.seg_bits))]
    if not parts:
        return jnp.zeros((0, pm.n), jnp.float32)
    stored = jnp.concatenate(parts, axis=0)
    return jnp.zeros_like(stored).at[jnp.asarray(pm.perm)].set(stored)


@jax.jit
def dequantize_packed(pm: PackedMatrix) -> jax.Array:
    """Float32 ``[K, n]`` reconstruction in the original unit order (0-bit units are zeros).

    jnp only and jitted (the segment structure is static pytree metadata), so it also runs inside
    an outer ``jax.jit`` — the pure-XLA reference path of the kernels.
    """
    return _dequantize(pm)


#: `dequantize_packed` compiled separately for matrices of one segment padded to a
#: `geometric_bucket` of units (`streamed.expert_factors`). The same program (same function, same
#: shapes), so the same values; but its shapes recur from layer to layer and run to run, so its
#: cache is kept when a layer's own `dequantize_packed` programs are dropped (which are one per
#: allocation-dependent shape and reused by no later layer).
dequantize_bucket = jax.jit(_dequantize)


__all__ = [
    "WORD_BITS",
    "num_words",
    "pack_bitplanes",
    "unpack_bitplanes",
    "unpack_bitplanes_jnp",
    "permutation_bits",
    "PackedMatrix",
    "pack_segments",
    "PackedRows",
    "pack_rows",
    "assemble_packed",
    "as_rows",
    "unit_bits",
    "unit_rows",
    "merge_shards",
    "dequantize_packed",
    "dequantize_bucket",
]
