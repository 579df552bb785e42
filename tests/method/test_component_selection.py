"""The decode budget (`budget_counts="decode"`): components kept by their read cost, against the
exact fixed-charge optimum.

Independent references: the read cost of an allocation recomputed here from first principles
(4-bit basis planes: 4·D bits per kept column + a bf16 scale per row, read by every token;
permutation entries as int32 and each unit's codes and group scales, read by one token in E/k;
a projection keeping no component still stores one), and the fixed-charge MILP written here in
CVXPY (a boolean per component that every unit with bits needs; HiGHS solves it exactly), whose
optimum the selection + allocation must come within 3 % of, within the budget.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax.method.allocate import BudgetError
from bitsmoe_jax.method.coefficients import PROJECTIONS, Coefficients
from bitsmoe_jax.method.layer_problem import LayerProblem, allocate_layers
from bitsmoe_jax.method.unit_store import MemoryUnits

E, K, D, F, R = 8, 2, 32, 16, 12  # experts, routed per token, hidden, unit length, components
CANDS = (0, 1, 2, 4)
GROUP = 16


def unit_bits(b: int) -> int:
    return 0 if b == 0 else F * b + 16 * (F // GROUP)


def problem(seed: int, budget_counts: str = "decode", super_experts=()) -> LayerProblem:
    rng = np.random.default_rng(seed)
    energy = rng.gamma(0.5, size=(3, E, R)) * np.exp(-np.arange(R) / 4.0)[None, None, :]
    loss = {
        p: energy[i][..., None] * 2.0 ** (-np.array(CANDS) * rng.uniform(0.8, 1.2, (E, R, 1)))
        for i, p in enumerate(PROJECTIONS)
    }
    zeros = {p: np.zeros((E, R, F), np.float32) for p in PROJECTIONS}
    return LayerProblem(
        index=0,
        num_experts=E,
        hidden=D,
        inter=F,
        store=MemoryUnits(zeros, zeros),
        coeffs=Coefficients(
            loss=loss,
            cost=np.array([unit_bits(b) for b in CANDS], np.int64),
            candidates=CANDS,
            mode="exact",
        ),
        bases={p: {"q": np.zeros((D, R), np.int8), "scale": np.ones(D)} for p in PROJECTIONS},
        basis_bits=4,
        stats=None,  # not read by the allocation
        super_experts=list(super_experts),
        super_bits=4,
        group_size=GROUP,
        budget_counts=budget_counts,
        top_k=K,
    )


def read_bits(bits: np.ndarray) -> float:
    """bits [3, E, R] → bits a batch-1 step reads per token, × E/k (the budget's unit)."""
    total = 0.0
    for p in range(3):
        kept = max(int(np.any(bits[p] > 0, axis=0).sum()), 1)  # an all-zero layer stores one
        basis = 4 * D * kept + 16 * D
        experts = sum(unit_bits(int(b)) for b in bits[p].ravel()) + 32 * E * kept
        total += basis + experts * K / E  # per token
    return total * E / K


def fixed_charge_optimum(pr: LayerProblem, budget: float) -> float:
    """min Σ loss over allocations whose `read_bits` fit `budget`, as a MILP."""
    import cvxpy as cp

    loss = np.concatenate([pr.coeffs.loss[p].reshape(-1, len(CANDS)) for p in PROJECTIONS])
    cost = np.broadcast_to(np.array([unit_bits(b) for b in CANDS], float), loss.shape)
    component = np.array([i * R + r for i in range(3) for _ in range(E) for r in range(R)])
    owner = np.zeros((len(loss), 3 * R))
    owner[np.arange(len(loss)), component] = 1.0
    x = cp.Variable(loss.shape, boolean=True)
    keep = cp.Variable(3 * R, boolean=True)
    per_column = 4 * D * E / K + 32 * E
    constraints = [
        cp.sum(x, axis=1) == 1,
        cp.sum(x[:, 1:], axis=1) <= owner @ keep,  # a unit with bits needs its component
        cp.sum(cp.multiply(cost, x)) + per_column * cp.sum(keep) + 3 * 16 * D * E / K <= budget,
    ]
    constraints += [cp.sum(keep[i * R : (i + 1) * R]) >= 1 for i in range(3)]
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(loss, x))), constraints)
    problem.solve(solver=cp.HIGHS)
    assert problem.status == "optimal"
    return float(problem.value)


def objective(pr: LayerProblem, bits: dict[str, np.ndarray]) -> float:
    return float(
        sum(
            np.take_along_axis(
                pr.coeffs.loss[p], np.searchsorted(CANDS, bits[p])[..., None], -1
            ).sum()
            for p in PROJECTIONS
        )
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("budget_bpw", [1.2, 1.6, 2.0])
def test_decode_budget_near_the_fixed_charge_optimum(seed, budget_bpw):
    pr = problem(seed)
    total = budget_bpw * pr.num_weights
    bits, _ = allocate_layers([pr], budget_bpw, "layer", {"allocator": "milp"})[0]
    assert read_bits(np.stack([bits[p] for p in PROJECTIONS])) <= total
    best = fixed_charge_optimum(pr, total)
    assert best - 1e-6 <= objective(pr, bits) <= 1.03 * best
    # the same budget counting stored bits reads more than it allows (the bases are charged once)
    stored, _ = allocate_layers([problem(seed, "stored")], budget_bpw, "layer", {})[0]
    assert read_bits(np.stack([stored[p] for p in PROJECTIONS])) > total


def test_super_expert_components_stay_and_a_budget_below_them_is_one_error():
    pr = problem(0, super_experts=[1])
    bits, _ = allocate_layers([pr], 3.5, "layer", {"allocator": "milp"})[0]
    for p in PROJECTIONS:
        assert np.all(bits[p][1] == 4)  # every component of expert 1: all kept
    # the 36 components it holds cost, with its units, 2.98 bits per expert weight
    with pytest.raises(BudgetError, match="budget_counts='decode'"):
        allocate_layers([problem(0, super_experts=[1])], 2.9, "layer", {})
