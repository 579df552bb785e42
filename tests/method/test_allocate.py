"""Bit allocation: MILP against brute force, greedy against the MILP and against LP duality."""

from __future__ import annotations

import itertools
import warnings

import cvxpy as cp
import numpy as np
import pytest

from bitsmoe_jax.method import allocate as al

BITS = np.array([0, 1, 2, 3, 4, 5, 6, 8])
KAPPA = np.array([1.0, 0.36, 0.115, 0.034, 0.0096, 0.0025, 0.00063, 0.00004])


def _instance(u: int, c: int, seed: int, nonconvex: bool) -> tuple[np.ndarray, np.ndarray]:
    """Realistic losses ``κ_b ‖unit‖²`` (heavy-tailed norms) and exact stored-bit costs.

    ``nonconvex`` multiplies every loss by independent noise, so hulls lose points and efficiencies
    tie and cross between units — the hard case for the hull walk.
    """
    rng = np.random.default_rng(seed)
    bits = BITS[:c]
    n = rng.choice([128, 256, 768], size=u)
    cost = np.where(bits[None] == 0, 0, n[:, None] * bits[None] + np.ceil(n[:, None] / 128) * 16)
    loss = rng.lognormal(0, 1.5, size=(u, 1)) * KAPPA[None, :c]
    if nonconvex:
        loss = loss * rng.lognormal(0, 0.4, size=(u, c))
    return loss, cost.astype(np.float64)


def _budget(cost: np.ndarray, frac: float) -> float:
    lo, hi = cost.min(1).sum(), cost.max(1).sum()
    return float(np.floor(lo + frac * (hi - lo)))


def _brute_force(loss: np.ndarray, cost: np.ndarray, budget: float) -> float:
    u, c = loss.shape
    combos = np.array(list(itertools.product(range(c), repeat=u)))
    rows = np.arange(u)
    tot_cost = cost[rows, combos].sum(1)
    tot_loss = loss[rows, combos].sum(1)
    return float(tot_loss[tot_cost <= budget].min())


def _lp_relaxation(loss: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """The LP relaxation written directly in CVXPY (continuous y), solved by HiGHS."""
    avail = np.isfinite(loss)
    y = cp.Variable(loss.shape, nonneg=True)
    cons = [cp.sum(y, axis=1) == 1, cp.sum(cp.multiply(np.where(avail, cost, 0), y)) <= budget]
    if not avail.all():
        cons.append(cp.sum(cp.multiply((~avail).astype(float), y)) == 0)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(np.where(avail, loss, 0), y))), cons)
    prob.solve(solver=cp.HIGHS)
    return float(prob.value)


def _dual_value(loss: np.ndarray, cost: np.ndarray, budget: float) -> float:
    """``max_λ≥0 Σ_u min_c (L + λ·cost) − λ·B`` (LP duality: equals the LP relaxation).

    The dual function is concave in λ, hence unimodal in log λ: a coarse log-spaced scan brackets
    the maximum, then golden-section search narrows it.
    """

    def g(log_lam: float) -> float:
        lam = np.exp(log_lam)
        return float(np.min(loss + lam * cost, axis=1).sum() - lam * budget)

    grid = np.linspace(np.log(1e-16), np.log(1e4), 32)
    vals = [g(t) for t in grid]
    i = int(np.argmax(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    phi = (np.sqrt(5) - 1) / 2
    c1, c2 = b - phi * (b - a), a + phi * (b - a)
    g1, g2 = g(c1), g(c2)
    for _ in range(64):
        if g1 < g2:
            a, c1, g1 = c1, c2, g2
            c2 = a + phi * (b - a)
            g2 = g(c2)
        else:
            b, c2, g2 = c2, c1, g1
            c1 = b - phi * (b - a)
            g1 = g(c1)
    return max(g1, g2, max(vals))


def _check_feasible(res: al.Allocation, loss: np.ndarray, cost: np.ndarray, budget: float) -> None:
    rows = np.arange(loss.shape[0])
    assert res.choice.shape == (loss.shape[0],)
    assert np.all(np.isfinite(loss[rows, res.choice]))
    assert cost[rows, res.choice].sum() <= budget
    assert res.total_cost == pytest.approx(cost[rows, res.choice].sum())
    assert res.objective == pytest.approx(loss[rows, res.choice].sum(), rel=1e-12)
    assert res.lower_bound <= res.objective * (1 + 1e-12)
    assert 0 <= res.gap


@pytest.mark.parametrize("seed", range(8))
def test_milp_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    loss, cost = _instance(6, 3, seed, nonconvex=bool(seed % 2))
    loss = loss + rng.random(loss.shape) * 0.01  # break exact ties so the optimum is unique-ish
    for frac in (0.0, 0.2, 0.5, 0.85, 1.0):
        budget = _budget(cost, frac)
        best = _brute_force(loss, cost, budget)
        milp = al.solve_milp(loss, cost, budget)
        _check_feasible(milp, loss, cost, budget)
        assert milp.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert milp.lower_bound <= best * (1 + 1e-9)
        greedy = al.solve_greedy(loss, cost, budget)
        _check_feasible(greedy, loss, cost, budget)
        assert greedy.objective >= best * (1 - 1e-12)
        assert greedy.lower_bound <= best * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_bound_is_the_lp_relaxation(seed):
    loss, cost = _instance(60, 8, seed, nonconvex=seed % 3 != 0)
    if seed >= 4:  # forbid some widths per unit, and duplicate units to create exact ties
        loss[::7, 2] = np.inf
        loss[1::5, 0] = np.inf
        loss[30:], cost[30:] = loss[:30], cost[:30]
    for frac in (0.05, 0.3, 0.7):
        budget = _budget(np.where(np.isfinite(loss), cost, -np.inf).clip(0), frac)
        budget = max(budget, float(np.where(np.isfinite(loss), cost, np.inf).min(1).sum()))
        res = al.solve_greedy(loss, cost, budget)
        _check_feasible(res, loss, cost, budget)
        assert res.lower_bound == pytest.approx(_lp_relaxation(loss, cost, budget), rel=1e-7)


@pytest.mark.parametrize("u,nonconvex", [(400, False), (400, True), (2000, False)])
def test_greedy_close_to_milp(u, nonconvex):
    loss, cost = _instance(u, 8, 7 + u, nonconvex)
    for frac in (0.25,) if u == 2000 else (0.1, 0.3, 0.6):
        budget = _budget(cost, frac)
        milp = al.solve_milp(loss, cost, budget)
        greedy = al.solve_greedy(loss, cost, budget)
        _check_feasible(milp, loss, cost, budget)
        _check_feasible(greedy, loss, cost, budget)
        assert milp.solver.startswith("milp-highs")
        assert greedy.objective >= milp.objective * (1 - 1e-6)  # MILP solved to 1e-6
        assert (greedy.objective - milp.objective) / milp.objective < 1e-3
        # both bounds are valid for the MILP optimum and the LP one is never above the MILP's
        assert greedy.lower_bound <= milp.objective * (1 + 1e-12)
        assert milp.lower_bound >= greedy.lower_bound * (1 - 1e-9)


def test_budget_extremes():
    loss, cost = _instance(50, 8, 3, nonconvex=True)
    rows = np.arange(50)
    lo = float(cost.min(1).sum())
    for solver in (al.solve_greedy, al.solve_milp):
        res = solver(loss, cost, lo)
        np.testing.assert_array_equal(cost[rows, res.choice], cost.min(1))
        res = solver(loss, cost, float(cost.max(1).sum()) * 2)
        np.testing.assert_allclose(loss[rows, res.choice], loss.min(1))
        assert res.gap == pytest.approx(0.0, abs=1e-12)


def test_budget_below_minimum_raises_with_numbers():
    loss, cost = _instance(10, 4, 0, nonconvex=False)
    cost = cost + 5.0  # every candidate costs something
    minimum = int(cost.min(1).sum())
    for fn in (al.solve_greedy, al.solve_milp, al.allocate):
        with pytest.raises(al.BudgetError) as err:
            fn(loss, cost, minimum - 1)
        assert isinstance(err.value, ValueError)
        msg = str(err.value)
        assert str(minimum - 1) in msg and str(minimum) in msg


def test_unavailable_candidates_and_bad_input():
    loss, cost = _instance(30, 5, 1, nonconvex=True)
    loss[:, -1] = np.inf  # nobody may take the widest candidate
    loss[0, :-2] = np.nan  # unit 0 must take candidate 3
    budget = _budget(np.where(np.isfinite(loss), cost, 0), 0.9)
    for fn in (al.solve_greedy, al.solve_milp):
        res = fn(loss, cost, budget)
        assert res.choice[0] == 3
        assert np.all(res.choice != 4)
        _check_feasible(res, loss, cost, budget)
    loss[1, :] = np.inf
    with pytest.raises(ValueError, match="no available candidate"):
        al.solve_greedy(loss, cost, budget)
    with pytest.raises(ValueError):
        al.solve_greedy(loss[:, :3], cost, budget)
    with pytest.raises(ValueError):
        al.allocate(loss, cost, budget, allocator="magic")


def test_allocate_dispatch():
    loss, cost = _instance(100, 6, 2, nonconvex=False)
    budget = _budget(cost, 0.3)
    assert al.allocate(loss, cost, budget).solver.startswith("milp-highs")
    assert al.allocate(loss, cost, budget, milp_max_units=50).solver == "greedy-hull"
    assert al.allocate(loss, cost, budget, allocator="greedy").solver == "greedy-hull"
    assert al.allocate(loss, cost, budget, allocator="milp", milp_max_units=1).solver.startswith(
        "milp-highs"
    )


def test_greedy_large_instance_matches_lp_duality():
    """2e5 units × 9 candidates: exercises the quickselect path; the bound must equal the dual
    optimum."""
    loss, cost = _instance(200_000, 8, 11, nonconvex=True)
    loss = np.concatenate([loss, loss[:, -1:] * 0.3], axis=1)  # a 16-bit candidate
    cost = np.concatenate([cost, cost[:, -1:] * 2.0], axis=1)
    for frac in (0.1, 0.4):
        budget = _budget(cost, frac)
        res = al.solve_greedy(loss, cost, budget)
        _check_feasible(res, loss, cost, budget)
        assert res.gap < 1e-4
        if frac == 0.1:
            assert res.lower_bound == pytest.approx(_dual_value(loss, cost, budget), rel=1e-8)


def test_milp_time_limit_never_returns_worse_than_greedy():
    loss, cost = _instance(400, 8, 5, nonconvex=True)
    budget = _budget(cost, 0.25)
    greedy = al.solve_greedy(loss, cost, budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CVXPY: "solution may be inaccurate"
        res = al.solve_milp(loss, cost, budget, time_limit=1e-3)
    _check_feasible(res, loss, cost, budget)
    assert res.objective <= greedy.objective
    assert res.lower_bound >= greedy.lower_bound * (1 - 1e-12)


@pytest.mark.parametrize("nonconvex", [False, True])
def test_one_cost_row_for_every_unit_may_be_a_read_only_view(nonconvex):
    """A layer's units all cost the same per candidate, so the layer passes its [U, C] costs as a
    broadcast of one row (no float64 copy per unit). The allocation must be the one the same
    table gets as a real array — the same choice, objective and bound, greedy and MILP — and
    still the LP relaxation's bound (computed independently)."""
    loss, full = _instance(120, 8, 11, nonconvex)
    row = full[np.argmax(full[:, -1])]
    full = np.tile(row, (loss.shape[0], 1))
    view = np.broadcast_to(row, full.shape)
    assert not view.flags.writeable and view.strides[0] == 0
    for frac in (0.1, 0.4):
        budget = _budget(full, frac)
        for solve in (al.solve_greedy, al.solve_milp):
            a, b = solve(loss, full, budget), solve(loss, view, budget)
            np.testing.assert_array_equal(a.choice, b.choice)
            assert (a.objective, a.lower_bound, a.total_cost) == (
                b.objective,
                b.lower_bound,
                b.total_cost,
            )
            _check_feasible(b, loss, full, budget)
        lp = _lp_relaxation(loss, full, budget)
        assert al.solve_greedy(loss, view, budget).lower_bound == pytest.approx(lp, rel=1e-7)
