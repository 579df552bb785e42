"""The shared bases' precision as an allocation decision, layer by layer (`basis_bits_choices`).

A basis at fewer bits costs fewer of the layer's budget bits, and the factors are fitted to the
dequantized basis, so what a coarser basis loses is only how well its components still compact the
experts' energy: which precision wins depends on the layer's dimensions and on its weights
(docs/quantizing.md, "Basis precision"). So for each candidate precision the layer's problem is
built — the float bases once (their Gram sums and eigendecompositions are shared), then the
factors, statistics and loss tables at that precision — and allocated at the first budget with the
basis charged at its stored cost (`layer_problem.allocate_layers`, per layer). The precision whose
allocation has the least predicted loss (the allocator's own objective: the summed loss-table
entries of the chosen bit-widths) is kept, with its allocation; the other problems are dropped.
Ties go to the fewer bits (fewer bytes read per decoded token).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bitsmoe_jax.method.allocate import Allocation, BudgetError
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.layer_problem import LayerProblem, allocate_layers
from bitsmoe_jax.parallel import distributed

#: `build(params=, store_dir=, vectors=)`: the layer's problem with these method settings, its units
#: in this directory, the float bases shared through `vectors` (`streamed.build_problem`)
ProblemBuilder = Callable[..., LayerProblem]


def predicted_loss(problem: LayerProblem, bits: dict[str, np.ndarray]) -> float:
    """The allocation's objective: each free unit's loss-table entry at its chosen bit-width
    (super experts' units are fixed at their width whatever the basis, and left out)."""
    loss, _, fixed = problem.unit_arrays()
    flat = np.concatenate([np.asarray(bits[p]).reshape(-1) for p in PROJECTIONS])
    column = {int(b): j for j, b in enumerate(problem.coeffs.candidates)}
    free = np.flatnonzero(~fixed)
    cols = np.array([column[int(b)] for b in flat[free]], np.int64)
    return float(loss[free, cols].sum())


def allocate_layer(
    problem: LayerProblem, budget: float, params: MethodConfig
) -> tuple[dict, list[Allocation]]:
    """The layer's allocation at `budget` with its own (per-layer) budget: process 0's bits on
    every process (a MILP with a time limit may stop at another incumbent on each host)."""
    bits, allocs = allocate_layers([problem], budget, "layer", params.allocator_options())[
        problem.index
    ]
    return distributed.broadcast_from_writer(bits), allocs


def build_with_basis_choice(
    params: MethodConfig,
    build: ProblemBuilder,
    scratch: Callable[[str], Path],
    budget: float,
    timings: dict,
) -> tuple[LayerProblem, tuple[dict, list[Allocation]] | None]:
    """The layer's problem, and with several `basis_bits_choices` its allocation at `budget`.

    One precision (or none listed): the problem as configured, and None (allocated by the caller).
    Several: one problem per precision, each allocated at `budget` with the layer's own budget;
    the least predicted loss wins (process 0's choice on every process), its problem is returned
    with its bits and allocation records, and the report says every candidate's predicted loss.
    A precision whose bases alone exceed the budget is skipped; if every one does, the error of
    the cheapest is raised.
    """
    choices = tuple(int(b) for b in params.basis_bits_choices)
    if len(choices) <= 1:
        fixed = dataclasses.replace(params, basis_bits=choices[0]) if choices else params
        return build(params=fixed, store_dir=scratch(""), vectors={}), None
    vectors: dict = {}
    tried: list[tuple[float, int, LayerProblem, dict, list[Allocation]]] = []
    error: BudgetError | None = None
    for b in sorted(choices):
        problem = build(
            params=dataclasses.replace(params, basis_bits=b),
            store_dir=scratch(f"basis{b}"),
            vectors=vectors,
        )
        t = time.time()
        try:
            bits, allocs = allocate_layer(problem, budget, params)
        except BudgetError as e:
            error = error or e
            problem.store.remove()
            continue
        finally:
            timings["allocation"] += time.time() - t
        tried.append((predicted_loss(problem, bits), b, problem, bits, allocs))
    if not tried:
        assert error is not None
        raise error
    best = min(range(len(tried)), key=lambda j: (tried[j][0], tried[j][1]))
    best = int(distributed.broadcast_from_writer(np.array([best]))[0])
    for j, candidate in enumerate(tried):
        if j != best:
            candidate[2].store.remove()
    _, _, problem, bits, allocs = tried[best]
    problem.basis_choice = {str(b): loss for loss, b, *_ in tried}
    return problem, (bits, allocs)
