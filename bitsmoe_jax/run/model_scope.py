"""The whole-model budget (`budget_scope="model"`) in two passes over the layers.

One allocation over every MoE layer needs every layer's loss tables before any layer's bits are
known. Keeping every layer's problem until then (its units and loss weights: float32, twice the
experts' bf16 bytes each — ~360 GB for Mixtral-8x7B) would tie the work directory's size to the
model's, calibrate every layer on the unquantized model's activations, and keep every expert's
units on every process. Instead:

1. **Tables pass.** Each layer's problem is built on the unquantized model's activations and only
   what the allocation reads is committed, to `scope_tables/` in the work directory: its loss
   tables and costs, ranks, the bases (their stored size is part of the budget), super experts and
   basis precision (`streamed.build_problem(keep="tables")`: the units are dropped chunk by chunk,
   never written).
2. **One allocation** over every layer's tables at the first budget (`budgets.model_allocation`),
   committed (so every process and every rerun packs the same bits).
3. **The layer pass** as with a per-layer budget — built again, on the activations of the layers
   before it *quantized* (`sequential`), rounded with error feedback, fitted, packed,
   expert-parallel over processes — but each layer packed at its bits from (2), on the bases its
   tables were made with (read back, not computed again: the Gram sums and eigendecompositions,
   the costliest stage at large hidden sizes, run once). So the units are those the tables priced
   and every stored bit is as allocated: the budget holds exactly, and only the calibration
   statistics, the rounding and the scale fit see the new activations. The loss tables of this
   pass are not computed (`keep="units"`) unless a later budget needs the stored problem.

Later budgets of the same run are allocated over the problems stored by the layer pass, as before.
Both passes resume: the tables pass at its first uncommitted layer, the layer pass at its own.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import numpy as np

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.layer_problem import LayerProblem
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.run.workdir import WorkDir

TABLES = "scope_tables"

#: `budget_scope="auto"` takes the whole-model budget up to this many units over all MoE layers.
#: The one allocation holds about 0.35 KiB a unit at its peak above the layers' tables (the joined
#: loss table, the convex hulls, a block of candidate moves) and takes ~9 µs a unit: measured
#: 2.09 GiB and 54 s for 6.3 M units by `python bench/allocation_memory.py` (random tables, greedy
#: allocator, an idle 2-core CPU; 4.76 GiB and 80 s, 0.8 KiB a unit, before the cost table became
#: a broadcast view and the candidate moves were listed by blocks). 8 M units: ~2.7 GiB, ~70 s —
#: Mixtral-8x7B (3.1 M units) is within it, DeepSeek-V2-Lite (10 M), Qwen3-30B-A3B (38 M) and
#: DeepSeek-V3 (319 M) are not. A constant, not the host's memory, so that a resumed run on
#: another machine makes the same choice.
AUTO_MAX_UNITS = 8_000_000
UNIT_BYTES = 360  # the allocation's peak bytes a unit, as measured above


def model_units(params: MethodConfig, config: ModelConfig) -> int:
    """Units the whole-model allocation solves over: every MoE layer's experts × the three
    projections' ranks (one unit per component of each expert's factors)."""
    rank = params.basis_rank(config.hidden_size) or config.hidden_size
    return len(config.moe_layers) * config.num_experts * 3 * rank


def resolve_scope(scope: str, params: MethodConfig, config: ModelConfig) -> tuple[str, str]:
    """("model" or "layer", why) for a configured `budget_scope`; "auto" by `AUTO_MAX_UNITS`."""
    if scope != "auto":
        return scope, f"budget scope: {scope} (as configured)"
    units = model_units(params, config)
    if units <= AUTO_MAX_UNITS:
        return "model", (
            f"budget scope: model (auto: one allocation over the {len(config.moe_layers)} MoE "
            f"layers' {units:,} units)"
        )
    return "layer", (
        f"budget scope: layer (auto: one allocation over all {units:,} units of the "
        f"{len(config.moe_layers)} MoE layers would need ~{units * UNIT_BYTES / 2**30:.0f} GiB; "
        f"the whole-model budget is taken up to {AUTO_MAX_UNITS:,} units — set "
        "--config.budget_scope=model to force it)"
    )


def tables_dir(work: WorkDir) -> WorkDir:
    """The tables pass's own work directory inside `work` (created by process 0; the leftovers of a
    killed commit are removed)."""
    tables = WorkDir(work.root / TABLES, writer=work.writer)
    if work.writer:
        tables.root.mkdir(exist_ok=True)
        for stale in [*tables.root.glob(".tmp-*"), *tables.root.glob(".scratch-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    return tables


@dataclasses.dataclass
class FirstBudgetBits:
    """The layer pass's side of a whole-model budget: each layer's bits from the committed
    allocation, and the bases and basis precision its tables were made with. Every process reads
    them from the work directory (on storage every host sees: docs/multihost.md), so every process
    packs the same bits."""

    work: WorkDir
    tables: WorkDir
    budget: float

    def __post_init__(self) -> None:
        self._bits, self.records, _ = self.work.load_model_allocation(self.budget)

    def table(self, i: int) -> LayerProblem:
        """Layer `i`'s committed tables (a problem without units)."""
        return self.tables.load_problem(i)

    @staticmethod
    def params(table: LayerProblem, params: MethodConfig) -> MethodConfig:
        """The method settings the layer is built with again: its tables' basis precision."""
        return dataclasses.replace(params, basis_bits=table.basis_bits, basis_bits_choices=())

    def take(
        self, table: LayerProblem, problem: LayerProblem
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """(bits, allocation records) of `problem`'s layer, which takes the super experts and
        basis choice its tables were allocated with (what its report then says)."""
        bits = self._bits[problem.index]
        for p in PROJECTIONS:
            if bits[p].shape != (problem.num_experts, problem.rank(p)):
                raise ValueError(
                    f"{self.work.root}: the whole-model allocation of layer {problem.index} has "
                    f"{p} bits of shape {bits[p].shape}; the layer has {problem.num_experts} "
                    f"experts of rank {problem.rank(p)}"
                )
        problem.super_experts = list(table.super_experts)
        problem.basis_choice = table.basis_choice
        return bits, self.records
