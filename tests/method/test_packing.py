"""Bit-plane packing and the segmented packed matrix: exact round trips and exact bit accounting."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsmoe_jax.method import packing as pk
from bitsmoe_jax.method import quantizers as qz


def _random_codes(rng: np.random.Generator, shape: tuple[int, ...], bits: int) -> np.ndarray:
    lo, hi = qz.code_range(bits)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 100, 257])
def test_round_trip_every_width_and_ragged_length(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = _random_codes(rng, (3, n), bits)
    # make sure both extremes of the range are exercised
    lo, hi = qz.code_range(bits)
    codes[0, 0] = lo
    codes[-1, -1] = hi
    words = pk.pack_bitplanes(codes, bits)
    assert words.dtype == np.uint32
    assert words.shape == (3, -(-n // 32) * bits) == (3, pk.num_words(n, bits))
    np.testing.assert_array_equal(pk.unpack_bitplanes(words, bits, n), codes)


@pytest.mark.parametrize("bits", [1, 3, 6, 8])
def test_jnp_unpack_matches_numpy_and_jits(bits):
    rng = np.random.default_rng(bits)
    codes = _random_codes(rng, (2, 3, 77), bits)
    words = pk.pack_bitplanes(codes, bits)
    assert words.shape == (2, 3, 3 * bits)
    ref = pk.unpack_bitplanes(words, bits, 77)
    np.testing.assert_array_equal(ref, codes)
    got = jax.jit(lambda w: pk.unpack_bitplanes_jnp(w, bits, 77))(words)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got), ref)


def test_layout_by_hand():
    # 3 bits: q = 1 -> u = 5 = 0b101, q = -2 -> u = 2 = 0b010, q = -4 -> u = 0, q = 3 -> u = 7.
    words = pk.pack_bitplanes(np.array([1, -2, -4, 3]), 3)
    # plane p holds bit p of value i at bit i
    assert words.tolist() == [0b1001, 0b1010, 0b1001]
    # 1 bit: the stored bit is the sign bit, 1 for x >= 0 (q = 0) and 0 for x < 0 (q = -1)
    assert pk.pack_bitplanes(np.array([0, -1, 0, 0, -1]), 1).tolist() == [0b01101]
    # value 32 starts the second block of `bits` words
    codes = np.zeros(33, np.int32) - 2  # u = 0 everywhere ...
    codes[32] = 1  # ... except value 32 (u = 3 = 0b11)
    assert pk.pack_bitplanes(codes, 2).tolist() == [0, 0, 1, 1]
    # 8 bits, 32 values: the word of plane 7 has the high bit of every u >= 128
    codes = np.arange(-128, 128, 8, dtype=np.int32)  # u = 0, 8, ..., 248
    w = pk.pack_bitplanes(codes, 8)
    expect = [sum(((8 * i >> p) & 1) << i for i in range(32)) for p in range(8)]
    assert w.tolist() == expect


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        pk.pack_bitplanes(np.array([2]), 2)
    with pytest.raises(ValueError, match="outside"):
        pk.pack_bitplanes(np.array([-5]), 3)
    with pytest.raises(ValueError):
        pk.pack_bitplanes(np.array([0]), 16)
    with pytest.raises(ValueError):
        pk.pack_bitplanes(np.array([0.5]), 4)


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    bits=st.integers(1, 8),
    n=st.integers(1, 200),
    lead=st.lists(st.integers(0, 3), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(bits, n, lead, seed):
    codes = _random_codes(np.random.default_rng(seed), (*lead, n), bits)
    words = pk.pack_bitplanes(codes, bits)
    assert words.shape == (*lead, pk.num_words(n, bits))
    back = pk.unpack_bitplanes(words, bits, n)
    np.testing.assert_array_equal(back, codes)
    # packing is injective on the stored slots: padding slots are zero
    nb = -(-n // 32)
    if nb * 32 > n and words.size:
        planes = words.reshape(*lead, nb, bits)[..., -1, :]
        assert np.all(planes >> np.uint32(n - (nb - 1) * 32) == 0)


@settings(max_examples=15, deadline=None, database=None)
@given(bits=st.integers(1, 8), n=st.sampled_from([1, 31, 45, 64]), seed=st.integers(0, 2**31 - 1))
def test_jnp_unpack_property(bits, n, seed):
    codes = _random_codes(np.random.default_rng(seed), (4, n), bits)
    words = pk.pack_bitplanes(codes, bits)
    np.testing.assert_array_equal(np.asarray(pk.unpack_bitplanes_jnp(words, bits, n)), codes)


def _units(k: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * rng.lognormal(0, 1, (k, 1))).astype(np.float32)


@pytest.mark.parametrize(
    "chunk_elements", [pk.CHUNK_ELEMENTS, 500]
)  # 500: chunks of 2 rows, the last one padded
@pytest.mark.parametrize("n,group_size", [(200, 64), (96, 128)])
def test_packed_matrix_dequantizes_like_per_unit_quantizer(
    n, group_size, chunk_elements, monkeypatch
):
    monkeypatch.setattr(pk, "CHUNK_ELEMENTS", chunk_elements)
    k = 14
    x = _units(k, n, n)
    w = np.random.default_rng(5).gamma(0.7, size=(k, n)).astype(np.float32)
    bits = np.array([3, 0, 16, 1, 2, 8, 3, 0, 5, 7, 4, 6, 2, 3])
    pm = pk.pack_segments(x, bits, group_size, w)
    assert pm.seg_bits == (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)
    assert pm.seg_sizes == (2, 1, 2, 3, 1, 1, 1, 1, 1, 1)
    # stable order by bit-width
    np.testing.assert_array_equal(pm.perm, np.argsort(bits, kind="stable"))
    np.testing.assert_array_equal(pm.bits_per_unit(), bits)
    got = np.asarray(pk.dequantize_packed(pm))
    assert got.shape == (k, n)
    for i, b in enumerate(bits):
        expect = np.asarray(qz.quantize_dequantize(x[i : i + 1], int(b), group_size, w[i : i + 1]))[
            0
        ]
        np.testing.assert_array_equal(got[i], expect, err_msg=f"unit {i} at {b} bits")
    np.testing.assert_array_equal(got[bits == 0], 0.0)
    # a PackedMatrix is a pytree: dequantize under jit gives the same result
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda m: pk.dequantize_packed(m) * 1.0)(pm)), got
    )
    leaves = jax.tree_util.tree_leaves(pm)
    assert len(leaves) == 1 + 2 * len(pm.seg_bits)


def test_packed_matrix_bit_accounting():
    n, g = 200, 64
    x = _units(9, n, 1)
    bits = np.array([2, 2, 0, 16, 3, 1, 8, 2, 0])
    pm = pk.pack_segments(x, bits, g)
    expect = sum(qz.stored_bits(n, int(b), g) for b in bits) + pk.permutation_bits(9)
    assert pm.stored_bits() == expect
    # the same count by hand: 7 words per plane (224 slots), 4 scales per unit, 9 * 4 perm bits
    by_hand = (
        3 * (7 * 2 * 32 + 4 * 16)  # three 2-bit units
        + (7 * 3 * 32 + 4 * 16)  # one 3-bit unit
        + (7 * 1 * 32 + 4 * 16)  # one 1-bit unit
        + (7 * 8 * 32 + 4 * 16)  # one 8-bit unit
        + 200 * 16  # one bf16 unit
        + 9 * 4  # permutation: ceil(log2 9) = 4 bits per entry
    )
    assert pm.stored_bits() == by_hand
    # the arrays really are that big
    payload = sum(a.nbytes * 8 for a in pm.payload)
    scales = sum(a.size * 16 for a in pm.scales)
    assert payload + scales + 9 * 4 == by_hand
    assert all(a.dtype == ml_dtypes.bfloat16 for a in pm.scales)


def test_permutation_bits():
    assert pk.permutation_bits(0) == 0
    assert pk.permutation_bits(1) == 0
    assert pk.permutation_bits(2) == 2
    assert pk.permutation_bits(2048) == 2048 * 11
    assert pk.permutation_bits(2049) == 2049 * 12


def test_pack_segments_single_width_and_validation():
    x = _units(5, 33, 2)
    pm = pk.pack_segments(x, [4] * 5, 16)
    assert pm.seg_bits == (4,) and pm.seg_sizes == (5,)
    np.testing.assert_array_equal(
        np.asarray(pk.dequantize_packed(pm)), np.asarray(qz.quantize_dequantize(x, 4, 16))
    )
    with pytest.raises(ValueError):
        pk.pack_segments(x, [4] * 4, 16)
    with pytest.raises(ValueError):
        pk.pack_segments(x, [4, 4, 4, 4, 9], 16)


def test_units_quantized_in_disjoint_row_sets_pack_like_one_call():
    """What a multi-process run does: each process quantizes its experts' rows, the results are
    merged."""
    k, n, gs = 12, 96, 32
    x = _units(k, n, 7)
    w = np.random.default_rng(8).gamma(0.7, size=(k, n)).astype(np.float32)
    bits = np.array([3, 0, 16, 1, 2, 8, 3, 0, 5, 2, 4, 6])
    whole = pk.pack_segments(x, bits, gs, w)
    parts = [pk.quantize_units(x, bits, gs, w, rows=np.arange(lo, lo + 4)) for lo in (0, 4, 8)]
    codes = sum(c.astype(np.int32) for c, _ in parts).astype(
        np.int8
    )  # disjoint rows: the others are zeros
    scales = sum(s for _, s in parts)
    merged = pk.pack_segments(x, bits, gs, w, quantized=(codes, scales))
    for a, b in zip(
        jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(merged), strict=False
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert not parts[0][0][4:].any() and not parts[0][1][4:].any()


def test_rows_packed_in_pieces_and_joined_equal_one_call_consumed_or_not():
    """Units packed a few rows at a time (`pack_rows`, as a streamed layer packs each chunk) and
    joined (`assemble_packed`) are `pack_segments` of all of them, byte for byte — also when the
    join empties the pieces as it copies them (`consume`, which must leave them empty)."""
    k, n, gs = 15, 96, 32
    x = _units(k, n, 9)
    w = np.random.default_rng(10).gamma(0.7, size=(k, n)).astype(np.float32)
    bits = np.array([3, 0, 16, 1, 2, 8, 3, 0, 5, 2, 4, 6, 2, 2, 16])
    whole = pk.pack_segments(x, bits, gs, w)
    codes, scales = pk.quantize_units(x, bits, gs, w)
    for consume in (False, True):
        pieces = [
            pk.pack_rows(x[lo:hi], bits[lo:hi], codes[lo:hi], scales[lo:hi], gs)
            for lo, hi in ((0, 4), (4, 5), (5, 11), (11, 15))
        ]
        joined = pk.assemble_packed(pieces, n, gs, consume=consume)
        for a, b in zip(
            jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(joined), strict=True
        ):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        assert all(not p.payload and not p.scales for p in pieces) == consume


def test_shards_of_consecutive_units_merge_to_the_whole_matrix():
    """What a run of several processes commits: each packs its consecutive experts' units into a
    matrix of their own (`pack_segments` of its rows), and the shards joined (`merge_shards`) are
    `pack_segments` of all the units, byte for byte; decoded, each shard is its rows of the whole
    matrix's reconstruction. Some shards lack widths others have (16 bits only in the last)."""
    k, n, gs = 18, 96, 32
    x = _units(k, n, 11)
    w = np.random.default_rng(12).gamma(0.7, size=(k, n)).astype(np.float32)
    bits = np.array([3, 0, 1, 2, 8, 3, 0, 5, 2, 4, 6, 2, 2, 1, 16, 3, 0, 16])
    whole = pk.pack_segments(x, bits, gs, w)
    cuts = ((0, 5), (5, 6), (6, 12), (12, 18))
    shards = [pk.pack_segments(x[lo:hi], bits[lo:hi], gs, w[lo:hi]) for lo, hi in cuts]
    merged = pk.merge_shards(shards)
    assert merged.seg_bits == whole.seg_bits and merged.seg_sizes == whole.seg_sizes
    for a, b in zip(
        jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(merged), strict=True
    ):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    dense = np.asarray(pk.dequantize_packed(whole))
    for (lo, hi), s in zip(cuts, shards, strict=True):
        assert np.array_equal(np.asarray(pk.dequantize_packed(s)), dense[lo:hi])
    with pytest.raises(ValueError, match="no packed shards"):
        pk.merge_shards([])
