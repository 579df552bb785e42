"""Which spectral components an allocation keeps when keeping one costs a fixed charge.

Why: a component's basis column is stored once for all experts, so keeping the component is a
fixed charge on top of its units' bits. Under the stored-bits budget that charge is small (D·b
bits against E·F·bits of its units), and the allocation simply drops the components every expert
gives 0 bits. Under a decode budget (`budget_counts="decode"`) it is not: every decoded token
reads the bases whole, while an expert's factors are read only by the tokens routed to it (k in
E), so a basis bit costs E/k times an expert bit (16× at Qwen3-30B-A3B's 8 of 128). A per-unit
allocation cannot see such a charge; dropping components then happens only by accident.

The Lagrangian relaxation of the fixed-charge problem handles it: at a price λ on bits, every unit
takes the width minimising loss + λ·cost, and a component is kept when its units' best values plus
λ·its charge beat dropping it (all its units at 0 bits, their loss at width 0). Components holding
a fixed (super-expert) unit are always kept. λ is bisected to the least price whose selection,
units and charges together, fits the budget; the allocation then runs on the kept components'
units only (`layer_problem.allocate_layers`), which spends what the relaxation leaves over.
"""

from __future__ import annotations

import numpy as np

from bitsmoe_jax.method.allocate import BudgetError


def _at_price(
    lam: float,
    loss: np.ndarray,
    cost: np.ndarray,
    fixed_col: np.ndarray,
    component: np.ndarray,
    charge: np.ndarray,
    drop_loss: np.ndarray,
    must_keep: np.ndarray,
) -> tuple[np.ndarray, float]:
    """(components kept [n], bits spent by them: units at their best width + charges) at price λ."""
    value = loss + lam * cost
    col = np.argmin(value, axis=1)
    col = np.where(fixed_col >= 0, fixed_col, col)
    rows = np.arange(len(loss))
    n = len(charge)
    keep_value = np.bincount(component, weights=value[rows, col], minlength=n) + lam * charge
    keep = must_keep | (keep_value < drop_loss)
    spent = float(cost[rows, col][keep[component]].sum() + charge[keep].sum())
    return keep, spent


def select_components(
    loss: np.ndarray,
    cost: np.ndarray,
    fixed_col: np.ndarray,
    component: np.ndarray,
    charge: np.ndarray,
    budget: float,
    zero_col: int,
    iterations: int = 100,
) -> np.ndarray:
    """The components [n] (bool) to keep so that their units and charges fit `budget` bits.

    loss, cost [U, C]: each unit's loss-table entries and bits at each candidate width; fixed_col
    [U]: the column a fixed unit must take (−1 = free); component [U]: each unit's component
    (0 … n−1); charge [n]: the fixed bits of keeping each component; zero_col: the column of
    width 0 (cost 0). Raises BudgetError when even the components that must stay do not fit.
    """
    n = len(charge)
    drop_loss = np.bincount(component, weights=loss[:, zero_col], minlength=n)
    must_keep = np.bincount(component, weights=(fixed_col >= 0), minlength=n) > 0
    args = (loss, cost, fixed_col, component, charge, drop_loss, must_keep)
    keep, spent = _at_price(0.0, *args)
    if spent <= budget:
        return keep
    # a price above every loss a bit can save drops every component that may be dropped
    hi = 1.0
    while True:
        keep_hi, spent_hi = _at_price(hi, *args)
        if spent_hi <= budget:
            break
        if not np.any(keep_hi & ~must_keep):
            raise BudgetError(
                f"{budget:.0f} bits cannot hold even the components that must stay "
                f"({spent_hi:.0f} bits: the super experts' units and their basis columns)"
            )
        hi *= 4.0
    lo = 0.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi) if lo == 0.0 else float(np.sqrt(lo * hi))
        keep_mid, spent_mid = _at_price(mid, *args)
        if spent_mid <= budget:
            hi, keep_hi = mid, keep_mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return keep_hi


__all__ = ["select_components"]
