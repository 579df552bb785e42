"""Decode bytes per token (`serve.read_bytes`, `bench/decode_bytes.py`): the count from a layer's
stored arrays equals the bytes of the array rows a step routed to those experts reads (sliced out
of the served block); all experts together equal the stored bits the effective bpw counts (the
permutation in its int32 container); the expected number of distinct experts equals a simulation
of random routing."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.serve.read_bytes import distinct_experts, layer_read_bytes
from bitsmoe_jax.serve.synthetic_experts import quantized_from_dense

E, D, F = 6, 64, 96


@pytest.fixture(scope="module", params=[4, 8])  # bases as bit-plane words / int8 codes
def block(request):
    rng = np.random.default_rng(0)
    gate, up = (rng.normal(size=(E, D, F)).astype(np.float32) for _ in range(2))
    down = rng.normal(size=(E, F, D)).astype(np.float32)
    # every storage kind: dropped (0), packed widths, 16-bit values; experts with different mixes
    bits = {p: rng.choice([0, 1, 2, 3, 4, 8, 16], size=(E, D)) for p in PROJECTIONS}
    bits["gate"][2] = 0  # an expert with nothing stored in one projection
    return quantized_from_dense(gate, up, down, bits, rng, group_size=32, basis_bits=request.param)


def _sliced_bytes(qe, experts: list[int]) -> int:
    """Bytes of the rows of `experts` cut out of the served block's arrays, plus the bases."""
    total = 0
    for p in PROJECTIONS:
        total += sum(np.asarray(v[...]).nbytes for v in qe.basis[p].values())
        pm = qe.packed_matrix(p)
        perm = np.asarray(pm.perm)
        r = len(perm) // E
        mine = np.isin(perm // r, experts)
        total += perm[mine].nbytes
        start = 0
        for i, size in enumerate(pm.seg_sizes):
            rows = mine[start : start + size]
            total += np.asarray(pm.payload[i])[rows].nbytes + np.asarray(pm.scales[i])[rows].nbytes
            start += size
    return total


def test_counted_bytes_equal_the_rows_a_step_reads(block):
    arrays, meta = block.to_tree()
    bases, per_expert = layer_read_bytes(arrays, meta)
    for routed in ([0, 3], [2], [1, 4, 5], list(range(E))):
        assert bases + int(per_expert[routed].sum()) == _sliced_bytes(block, routed), routed
    assert len(set(per_expert.tolist())) > 1  # the experts' mixes differ, and so do their bytes


def test_every_expert_and_the_bases_are_the_stored_bits(block):
    arrays, meta = block.to_tree()
    bases, per_expert = layer_read_bytes(arrays, meta)
    # the effective bpw counts the permutation at ceil(log2 K) bits an entry; a step reads its
    # int32 container
    k = E * D
    container = 3 * k * (32 - int(np.ceil(np.log2(k))))
    assert 8 * (bases + int(per_expert.sum())) - container == block.stored_bits()


@pytest.mark.parametrize(("experts", "top_k", "batch"), [(8, 2, 1), (128, 8, 64), (16, 2, 7)])
def test_distinct_experts_matches_random_routing(experts, top_k, batch):
    rng = np.random.default_rng(1)
    trials = 4000
    counts = [
        len({int(e) for _ in range(batch) for e in rng.choice(experts, top_k, replace=False)})
        for _ in range(trials)
    ]
    expected = distinct_experts(experts, top_k, batch)
    assert abs(np.mean(counts) - expected) < 4 * np.std(counts) / np.sqrt(trials) + 1e-9
