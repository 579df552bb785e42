"""Expert-wise mixed precision baseline: scores, allocation rule, quantization."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from bitsmoe_jax.baselines.expertwise import (
    ExpertScores,
    allocate_expert_bits,
    expert_scores,
    expertwise_quantize,
    intra_neuron_variance,
)
from bitsmoe_jax.baselines.rtn import rtn_quantize

D, F = 24, 20  # distinct so a transposed tensor is a shape error


def _experts(e, seed=0, d=D, f=F):
    rng = np.random.default_rng(seed)
    gate = rng.normal(0, 0.02, (e, d, f)).astype(np.float32)
    up = rng.normal(0, 0.02, (e, d, f)).astype(np.float32)
    down = rng.normal(0, 0.02, (e, f, d)).astype(np.float32)
    return gate, up, down


def _scores(change, high=None):
    change = np.asarray(change, np.float64)
    high = np.zeros(change.shape, bool) if high is None else np.asarray(high, bool)
    return ExpertScores(change, np.zeros_like(change), high, False)


def test_intra_neuron_variance_matches_python_loop():
    e = 3
    gate, up, down = _experts(e, seed=1)
    # Make one neuron's weights spread across matrices at different scales.
    down[1, 7, :] *= 9.0
    got = intra_neuron_variance(gate, up, down)
    for i in range(e):
        best = -1.0
        for f in range(F):
            vals = [float(gate[i, d, f]) for d in range(D)]
            vals += [float(up[i, d, f]) for d in range(D)]
            vals += [float(down[i, f, d]) for d in range(D)]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / len(vals)
            best = max(best, var)
        assert got[i] == pytest.approx(best, rel=1e-9)
    assert np.argmax(got) == 1


def test_intra_neuron_variance_rejects_bad_shapes():
    gate, up, down = _experts(2)
    with pytest.raises(ValueError):
        intra_neuron_variance(gate, up, np.swapaxes(down, 1, 2))


@pytest.mark.parametrize("e", [1, 4, 7, 8, 16])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("budget", [2.2, 2.5, 2.75, 3.0, 3.125, 3.3, 3.6, 4.0, 4.125, 4.2])
def test_allocation_is_largest_count_within_budget(e, group_size, budget):
    overhead = Fraction(16, group_size)
    if Fraction(budget) < 2 + overhead:
        with pytest.raises(ValueError):
            allocate_expert_bits(_scores(np.arange(e)), budget, group_size=group_size)
        return
    rng = np.random.default_rng(e)
    bits = allocate_expert_bits(_scores(rng.random(e)), budget, group_size=group_size)
    assert bits.shape == (e,) and bits.dtype.kind == "i"
    # Reference: brackets of the target code bits, exact rational arithmetic, brute force over n.
    target = Fraction(budget) - overhead
    low = int(target // 1)
    high = low + 1

    def mean_bpw(n):
        return Fraction(e * low + n * (high - low), e) + overhead

    feasible = [n for n in range(e + 1) if mean_bpw(n) <= Fraction(budget)]
    n_ref = max(feasible)
    assert set(np.unique(bits)) <= {low, high}
    assert int((bits == high).sum()) == n_ref
    assert Fraction(int(bits.sum()), e) + overhead <= Fraction(budget)
    if n_ref < e:
        assert mean_bpw(n_ref + 1) > Fraction(budget)  # one more high-bit expert would exceed it


def test_explicit_low_high_bits():
    bits = allocate_expert_bits(
        _scores([0.5, 0.1, 0.3, 0.2]), 3.125 + 0.5, low_bits=2, high_bits=4, group_size=128
    )
    # mean code bits 3.5 allowed: 2 + n * 2 / 4 <= 3.5 -> n = 3; largest change (expert 0) stays
    # low.
    np.testing.assert_array_equal(bits, [2, 4, 4, 4])


def test_budget_too_small_raises_with_numbers():
    with pytest.raises(ValueError, match="2.125"):
        allocate_expert_bits(_scores([1.0, 2.0]), 2.1, group_size=128)
    with pytest.raises(ValueError, match="3.25"):
        allocate_expert_bits(_scores([1.0, 2.0]), 3.2, low_bits=3, high_bits=4, group_size=64)


def test_smaller_router_norm_gets_high_bits_first_with_index_ties():
    change = [0.9, 0.2, 0.5, 0.2, 0.7, 0.1]
    e = len(change)
    # Budget for exactly k high-bit experts: 2 + k/e + 1/8.
    expected_order = [5, 1, 3, 2, 4, 0]  # ascending change, tie 1 vs 3 by index
    for k in range(e + 1):
        bits = allocate_expert_bits(_scores(change), 2 + k / e + 0.125, group_size=128)
        assert sorted(np.flatnonzero(bits == 3).tolist()) == sorted(expected_order[:k])


def test_high_variance_protected_before_router_order():
    change = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    high = [False, False, False, False, True, True]
    s = _scores(change, high)
    bits = allocate_expert_bits(s, 2 + 1 / 6 + 0.125, group_size=128)
    np.testing.assert_array_equal(np.flatnonzero(bits == 3), [4])  # smaller change among protected
    bits = allocate_expert_bits(s, 2 + 3 / 6 + 0.125, group_size=128)
    np.testing.assert_array_equal(np.flatnonzero(bits == 3), [0, 4, 5])


def test_planted_high_variance_expert_gets_high_bits():
    e = 8
    gate, up, down = _experts(e, seed=3)
    rng = np.random.default_rng(4)
    router = rng.normal(0, 0.02, (D, e))
    router *= np.linspace(1.0, 3.0, e) / np.linalg.norm(
        router, axis=0
    )  # norms ascending with index
    up[6, :, 3] *= 25.0  # one wide neuron in expert 6 (large router norm)
    default = expert_scores(router, gate, up, down)  # quantile 0.75: two of eight protected
    assert default.high_variance[6] and default.high_variance.sum() == 2
    bits = allocate_expert_bits(default, 2 + 1 / e + 0.125, group_size=128)
    protected = np.flatnonzero(default.high_variance)
    assert np.flatnonzero(bits == 3).tolist() == [
        protected[np.argmin(default.router_change[protected])]
    ]
    s = expert_scores(router, gate, up, down, variance_quantile=0.875)  # only the maximum
    np.testing.assert_array_equal(np.flatnonzero(s.high_variance), [6])
    assert not s.exact
    np.testing.assert_allclose(s.router_change, np.linalg.norm(router, axis=0))
    assert np.argmax(s.variance) == 6
    assert s.high_variance[6]
    # One high-bit slot: without protection it would go to expert 0 (smallest norm).
    bits = allocate_expert_bits(s, 2 + 1 / e + 0.125, group_size=128)
    np.testing.assert_array_equal(np.flatnonzero(bits == 3), [6])
    no_protect = expert_scores(router, gate, up, down, variance_quantile=None)
    assert not no_protect.high_variance.any()
    bits = allocate_expert_bits(no_protect, 2 + 1 / e + 0.125, group_size=128)
    np.testing.assert_array_equal(np.flatnonzero(bits == 3), [0])


def test_high_variance_set_is_above_quantile():
    gate, up, down = _experts(8, seed=5)
    router = np.random.default_rng(6).normal(size=(D, 8))
    s = expert_scores(router, gate, up, down, variance_quantile=0.75)
    v = s.variance
    ranks = np.argsort(np.argsort(v))
    # 8 distinct values: the 0.75 quantile lies between the 6th and 7th smallest (0-based 5 and 6).
    np.testing.assert_array_equal(s.high_variance, ranks >= 6)


def test_router_init_uses_exact_change():
    e = 5
    gate, up, down = _experts(e, seed=7)
    rng = np.random.default_rng(8)
    init = rng.normal(0, 1.0, (D, e))
    delta = rng.normal(0, 1.0, (D, e))
    delta /= np.linalg.norm(delta, axis=0)
    amounts = np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    router = init + delta * amounts
    exact = expert_scores(router, gate, up, down, router_init=init, variance_quantile=None)
    assert exact.exact
    np.testing.assert_allclose(exact.router_change, amounts, rtol=1e-12)
    bits = allocate_expert_bits(exact, 2 + 2 / e + 0.125, group_size=128)
    np.testing.assert_array_equal(np.flatnonzero(bits == 3), [1, 3])
    proxy = expert_scores(router, gate, up, down, variance_quantile=None)
    proxy_bits = allocate_expert_bits(proxy, 2 + 2 / e + 0.125, group_size=128)
    expected_proxy = np.sort(np.argsort(np.linalg.norm(router, axis=0), kind="stable")[:2])
    np.testing.assert_array_equal(np.flatnonzero(proxy_bits == 3), expected_proxy)
    assert not np.array_equal(proxy_bits, bits)  # init norms dominate the proxy here
    with pytest.raises(ValueError):
        expert_scores(router, gate, up, down, router_init=init[:, :3])


def test_expertwise_quantize_matches_per_expert_rtn():
    e, g = 6, 8
    gate, up, down = _experts(e, seed=9)
    router = np.random.default_rng(10).normal(size=(D, e)) * np.linspace(1, 2, e)
    budget = 3 + 2 / e + 16 / g
    out = expertwise_quantize(gate, up, down, router, budget, group_size=g)
    bits = out["bits"]
    assert set(bits.tolist()) == {3, 4}
    assert (bits == 4).sum() == 2
    assert out["bpw"] == pytest.approx(bits.mean() + 16 / g)
    assert out["bpw"] <= budget + 1e-12
    ref_bits = allocate_expert_bits(expert_scores(router, gate, up, down), budget, group_size=g)
    np.testing.assert_array_equal(bits, ref_bits)
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        assert out[name].shape == w.shape
        for i in range(e):
            np.testing.assert_array_equal(out[name][i], rtn_quantize(w[i], int(bits[i]), g, 0))
    # Different bits really give different grids: 4-bit experts are closer to the original.
    err = [np.abs(out["gate"][i] - gate[i]).mean() for i in range(e)]
    assert max(err[i] for i in range(e) if bits[i] == 4) < min(
        err[i] for i in range(e) if bits[i] == 3
    )
    # Groups run along the contraction axis, as apply_rtn's axis=1 on the stacked [E, ...] arrays.
    same = [i for i in range(e) if bits[i] == bits[0]]
    np.testing.assert_array_equal(out["down"][same], rtn_quantize(down[same], int(bits[0]), g, 1))


def test_expertwise_quantize_custom_quantizer_calls():
    e = 4
    gate, up, down = _experts(e, seed=11)
    router = np.random.default_rng(12).normal(size=(D, e))
    calls = []

    def quantizer(w, bits, group_size, axis):
        calls.append((w.shape, bits, group_size, axis))
        return np.full_like(w, float(bits))

    out = expertwise_quantize(
        gate, up, down, router, 2 + 1 / e + 0.25, group_size=64, quantizer=quantizer
    )
    assert len(calls) == 3 * e
    assert all(c[2] == 64 and c[3] == 0 for c in calls)
    assert {c[0] for c in calls} == {(D, F), (F, D)}
    for name in ("gate", "up", "down"):
        np.testing.assert_array_equal(out[name][:, 0, 0], out["bits"].astype(np.float32))
    assert (out["bits"] == 3).sum() == 1
