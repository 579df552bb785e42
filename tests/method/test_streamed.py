"""The streamed layer (`method.streamed`) against the whole-layer reference functions.

Truth here is the readable whole-layer code the streamed stages replace in the run: `make_bases`
(one Gram sum over every expert), `collect_expert_stats`, `layer_units`, `loss_weights`,
`loss_coefficients`, `grouped_swiglu` and `pack_segments` over the whole `[E, ...]` stacks. The
streamed stages must give *the same bits* for every chunk size — not close values — because the
allocation and the rounding branch on them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.method import packing, sharded, streamed
from bitsmoe_jax.method.calibrate import collect_expert_stats
from bitsmoe_jax.method.coefficients import (
    PROJECTIONS,
    layer_units,
    loss_coefficients,
    loss_weights,
)
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.error_feedback import CalibrationInputs
from bitsmoe_jax.method.expert_source import ArraySource, plan_chunk
from bitsmoe_jax.method.layer_problem import LayerProblem, allocate_layers, make_bases
from bitsmoe_jax.method.packing import pack_segments
from bitsmoe_jax.method.unit_store import DiskUnits, MemoryUnits
from bitsmoe_jax.models.moe import combine, grouped_swiglu
from tests.method.random_layer import (
    E,
    F,
    build_layer_problem,
    make_layer,
    method_params,
)


@pytest.fixture(scope="module")
def layer():
    return make_layer()


def _params(**kw) -> MethodConfig:
    return method_params(**kw)


def _problem(layer, params, chunk, store_dir=None, **kw) -> LayerProblem:
    return build_layer_problem(layer, params, chunk, store_dir, **kw)


def _reference(layer, params: MethodConfig):
    """(stored bases, units, weights, loss, stats) from the whole-layer functions."""
    block, x, gate, up, down = layer
    stored, deq = make_bases(gate, up, down, None, params.basis_bits)
    units = layer_units(gate, up, down, deq)
    logits, w, idx = block.router(x)
    stats = collect_expert_stats(
        x, logits, idx, w, gate, up, deq["gate"], deq["up"], params.min_tokens
    )
    weights = loss_weights(
        stats, down, {p: units[p].shape[1] for p in PROJECTIONS}, params.expert_mass_floor
    )
    coeffs = loss_coefficients(
        units, weights, params.candidate_bits, params.group_size, params.coefficient_mode
    )
    return stored, units, weights, coeffs, stats


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_problem_equals_the_whole_layer_reference_for_every_chunk(layer, mode, tmp_path):
    params = _params(coefficient_mode=mode)
    stored, units, weights, coeffs, stats = _reference(layer, params)
    assert stats.starved == [5]
    for chunk in (1, 3, None):
        store = tmp_path / f"units_{chunk}"
        problem = _problem(layer, params, chunk, store if chunk == 3 else None)
        assert problem.stats.starved == [5]
        np.testing.assert_array_equal(problem.stats.mass, stats.mass)
        np.testing.assert_array_equal(problem.stats.c_down, stats.c_down)
        for p in PROJECTIONS:
            np.testing.assert_array_equal(problem.bases[p]["q"], stored[p]["q"])
            np.testing.assert_array_equal(problem.coeffs.loss[p], coeffs.loss[p])
            u, w = problem.store.load(p, range(E))
            np.testing.assert_array_equal(u, units[p])
            np.testing.assert_array_equal(w, weights[p])
        if chunk == 3:
            assert isinstance(problem.store, DiskUnits)
            reopened = DiskUnits(store)
            np.testing.assert_array_equal(reopened.load("down", [4, 1])[0], units["down"][[4, 1]])


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_the_two_passes_of_a_whole_model_budget_split_one_problem(layer, mode):
    """`keep="tables"` (first pass) has the whole-layer reference's loss tables and no units;
    `keep="units"` on the first pass's stored bases (second pass) has the same units and packs, at
    the same bits, exactly what the full problem packs — so the bits chosen on the first pass's
    tables mean the same units."""
    params = _params(coefficient_mode=mode, basis_bits=6)
    _, units, _, coeffs, _ = _reference(layer, params)
    tables = _problem(layer, params, 3, keep="tables")
    again = _problem(layer, params, 3, keep="units", bases=tables.bases)
    full = _problem(layer, params, 3)
    for p in PROJECTIONS:
        np.testing.assert_array_equal(tables.coeffs.loss[p], coeffs.loss[p])
        assert tables.rank(p) == full.rank(p) == units[p].shape[1]
        np.testing.assert_array_equal(again.store.load(p, range(E))[0], units[p])
        assert not again.coeffs.loss[p].any()
    with pytest.raises(RuntimeError, match="loss tables only"):
        tables.store.load("gate", [0])
    bits, _ = allocate_layers([tables], 2.0, "layer", {"allocator": "greedy"})[0]
    ref_bases, ref = streamed.round_and_pack(full, bits)
    bases, packed = streamed.round_and_pack(again, bits)
    for p in PROJECTIONS:
        np.testing.assert_array_equal(packed[p].perm, ref[p].perm)
        for a, b in zip(
            packed[p].payload + packed[p].scales, ref[p].payload + ref[p].scales, strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for k in ref_bases[p]:
            np.testing.assert_array_equal(bases[p][k], ref_bases[p][k])
    with pytest.raises(ValueError, match="keep="):
        _problem(layer, params, 3, keep="some")


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_packing_is_the_same_for_every_chunk_and_equals_pack_segments(layer, rounding):
    params = _params(rounding=rounding)
    problem = _problem(layer, params, None)
    bits, _ = allocate_layers([problem], 2.5, "layer", {"allocator": "greedy"})[0]
    ref_bases, ref = streamed.round_and_pack(problem, bits)
    for chunk in (1, 3):
        bases, packed = streamed.round_and_pack(problem, bits, chunk=chunk)
        for p in PROJECTIONS:
            assert packed[p].seg_bits == ref[p].seg_bits
            np.testing.assert_array_equal(packed[p].perm, ref[p].perm)
            for a, b in zip(
                packed[p].payload + packed[p].scales, ref[p].payload + ref[p].scales, strict=True
            ):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert bases[p].keys() == ref_bases[p].keys() == {"planes", "scale"}  # 4-bit bases
            for k in bases[p]:
                np.testing.assert_array_equal(bases[p][k], ref_bases[p][k])
    if rounding == "nearest":  # no error feedback: the units as they are, packed in one call
        for p in PROJECTIONS:
            keep = problem.kept(p, bits[p])
            u, w = problem.store.load(p, range(E))
            whole = pack_segments(
                u[:, keep].reshape(-1, F),
                bits[p][:, keep].reshape(-1),
                problem.group_size,
                w[:, keep].reshape(-1, F),
            )
            np.testing.assert_array_equal(whole.perm, ref[p].perm)
            for a, b in zip(whole.payload, ref[p].payload, strict=True):
                np.testing.assert_array_equal(a, b)


def test_gram_accumulator_is_the_one_tree_for_every_chunk():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 16, 28)).astype(np.float32)
    layout = sharded.expert_layout(sharded.single_device_mesh(), 5)
    ref = sharded.gram_sum(
        layout, sharded.expert_array(layout, lambda e: w[e], (16, 28), np.float32), False
    )
    for chunk in (1, 3, 8):
        acc = sharded.GramAccumulator(layout, False)
        for rnd in layout.rounds(chunk):
            acc.add_round(rnd, lambda e: w[e], (16, 28))
        np.testing.assert_array_equal(acc.result(), ref)


def test_streamed_expert_outputs_equal_grouped_swiglu(layer):
    block, x, gate, up, down = layer
    plan = block.plan(x)
    ref = np.asarray(grouped_swiglu(x[plan.token], plan.group_sizes, gate, up, down))
    sizes = np.asarray(plan.group_sizes)
    for chunk in (1, 3, None):
        out = streamed.sorted_expert_outputs(
            x[plan.token], sizes, ArraySource(gate, up, down), chunk
        )
        np.testing.assert_array_equal(out, ref)
    # the block's output, combined chunk by chunk, is combine's over all sorted rows, bit for bit
    for dtype in (jnp.float32, jnp.bfloat16):
        xd = x.astype(dtype)
        rows = grouped_swiglu(xd[plan.token], plan.group_sizes, gate, up, down)
        want = np.asarray(combine(plan, rows.astype(dtype), x.shape[0]))
        for chunk in (1, 2, 3, None):
            streamed_block = streamed.StreamedExperts(ArraySource(gate, up, down), chunk)
            np.testing.assert_array_equal(
                np.asarray(streamed_block(xd, plan)), want, err_msg=f"{dtype} {chunk}"
            )


def test_super_expert_detection_streamed_equals_the_whole_layer(layer):
    from bitsmoe_jax.method.layer_problem import detect_super_experts

    block, x, gate, up, down = layer
    loud = down.copy()
    loud[2] *= 50.0
    block.experts.down[...] = jnp.asarray(loud)
    try:
        want = detect_super_experts(x, block, 8.0)
        got = streamed.detect_super_experts(x, block.plan(x), ArraySource(gate, up, loud), 1, 8.0)
    finally:
        block.experts.down[...] = jnp.asarray(down)
    assert got == want == [2]


def test_memory_units_and_disk_units_agree(tmp_path):
    rng = np.random.default_rng(1)
    u = {p: rng.normal(size=(4, 3, 5)).astype(np.float32) for p in PROJECTIONS}
    w = {p: rng.random(size=(4, 3, 5)).astype(np.float32) for p in PROJECTIONS}
    disk = DiskUnits(tmp_path / "s", {p: (4, 3, 5) for p in PROJECTIONS})
    for p in PROJECTIONS:
        for e in (3, 0, 2, 1):
            disk.put(p, e, u[p][e], w[p][e])
    linked = disk.link_into(tmp_path / "committed")
    disk.remove()
    mem = MemoryUnits(u, w)
    for p in PROJECTIONS:
        for a, b in zip(linked.load(p, [2, 0]), mem.load(p, [2, 0]), strict=True):
            np.testing.assert_array_equal(a, b)
        assert linked.rank(p) == mem.rank(p) == 3


def test_chunk_plan():
    plan = plan_chunk(4096, 14336, 8, 4096, host_memory_gb=24, expert_chunk=None)
    assert plan.chunk == 1  # a Mixtral expert's working set is far beyond a tenth of 24 GiB
    assert plan_chunk(64, 48, 8, 1024, 24, None).chunk == 8  # tiny experts: the whole layer
    assert plan_chunk(64, 48, 8, 1024, 24, 3).chunk == 3
    # the chunk does not grow with the number of experts (DeepSeek-V3 dims, 16 vs 64 experts)
    assert (
        plan_chunk(7168, 2048, 16, 4096, 24, None).chunk
        == plan_chunk(7168, 2048, 64, 4096, 24, None).chunk
    )
    assert "memory plan: 3 of 8 experts" in plan_chunk(64, 48, 8, 1024, 24, 3).describe(8)
    # two processes on one machine: each plans with half of it, so holds about half the experts
    one, two = (plan_chunk(2048, 768, 128, 4096, 24, None, host_processes=n) for n in (1, 2))
    assert two.budget_bytes == one.budget_bytes // 2 and 1 <= two.chunk <= (one.chunk + 1) // 2
    assert "each of its 2 processes" in two.describe(128)


def test_calibration_inputs_are_kept_for_error_feedback(layer):
    problem = _problem(layer, _params(rounding="gptq"), 2)
    block, x, *_ = layer
    _, w, idx = block.router(x)
    assert isinstance(problem.calib, CalibrationInputs)
    np.testing.assert_array_equal(problem.calib.expert_idx, np.asarray(idx))
    np.testing.assert_array_equal(problem.calib.expert_w, np.asarray(w))


def test_quantized_forward_streamed_equals_the_packed_block(layer):
    from bitsmoe_jax.serve.quantized_experts import pack_layer

    block, x, *_ = layer
    problem = _problem(layer, _params(), None)
    bits, _ = allocate_layers([problem], 2.5, "layer", {"allocator": "greedy"})[0]
    qe = pack_layer(problem, bits)
    plan = block.plan(x)
    want = np.asarray(qe(x, plan))
    for chunk in (1, 4, None):
        got = np.asarray(streamed.StreamedQuantizedExperts(qe, chunk)(x, plan))
        np.testing.assert_array_equal(got, want)
    dense = np.asarray(packing.dequantize_packed(qe.packed_matrix("up")))
    np.testing.assert_array_equal(
        streamed.expert_factors(qe.packed_matrix("up"), E, [4, 1]),
        dense.reshape(E, -1, F)[[4, 1]],
    )


def test_geometric_bucket_sizes():
    """Every count gets a size at least as large, at most 1.5× larger, from a log-sized set."""
    from bitsmoe_jax.method.shape_buckets import geometric_bucket

    sizes = [geometric_bucket(n) for n in range(1, 5000)]
    assert all(b >= n for n, b in zip(range(1, 5000), sizes, strict=True))
    assert all(b <= max(2, 1.5 * n) for n, b in zip(range(1, 5000), sizes, strict=True))
    assert len(set(sizes)) <= 2 * 13 + 1  # 2^k and 3·2^k up to 8192
    assert sorted(set(sizes))[:8] == [1, 2, 3, 4, 6, 8, 12, 16]


def _mesh_of_processes(n: int, devices_each: int = 2):
    """A stand-in layout whose mesh holds `devices_each` devices of each of `n` processes (all
    `basis_owners` reads of it)."""
    from types import SimpleNamespace

    devs = np.array(
        [SimpleNamespace(process_index=i) for i in range(n) for _ in range(devices_each)]
    )
    return SimpleNamespace(mesh=SimpleNamespace(devices=devs))


@pytest.mark.parametrize(
    ("processes", "expected"),
    [
        (1, [[("gate", 0)], [("up", 0)], [("down", 0)]]),
        (2, [[("gate", 0), ("up", 1)], [("down", 0)]]),
        (3, [[("gate", 0), ("up", 1), ("down", 2)]]),
        (4, [[("gate", 0), ("up", 1), ("down", 2)]]),
    ],
)
def test_eigendecompositions_split_over_the_processes(processes, expected):
    """Each process eigendecomposes ⌈3 / processes⌉ projections at most, one per wave; one process
    keeps the order of a run without processes (Gram, basis, next Gram). The bases' bytes on
    several processes are checked against one device's in tests/distributed/test_multihost.py."""
    waves = streamed.basis_owners(list(streamed.PROJECTIONS), _mesh_of_processes(processes))
    assert waves == expected
    per_process = [sum(owner == i for wave in waves for _, owner in wave) for i in range(processes)]
    assert max(per_process) == -(-3 // processes)
    # a layer whose gate/up vectors are cached (another basis precision) decomposes down only
    assert streamed.basis_owners(["down"], _mesh_of_processes(processes)) == [[("down", 0)]]
