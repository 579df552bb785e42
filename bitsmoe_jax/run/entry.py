"""One quantization run from a `RunConfig`, whatever the method; and the Python entry point.

`python -m bitsmoe_jax.quantize` and `bitsmoe_jax.quantize_checkpoint` both end here, so a run from
research code writes exactly what the command line writes (checkpoints, reports, the Pareto table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitsmoe_jax.run.baseline_driver import quantize_baseline
from bitsmoe_jax.run.budgets import budget_dirs
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.driver import quantize
from bitsmoe_jax.run.outputs import check_output_location
from bitsmoe_jax.run.report import write_pareto


def run_quantization(
    run: RunConfig, progress: bool = True
) -> tuple[list[dict[str, Any]], Path | None]:
    """(the reports of every budget, the Pareto table's path when there are several budgets)."""
    check_output_location(run.output_dir, [d for _, d in budget_dirs(run)])
    if run.method == "bitsmoe":
        reports = quantize(run, progress=progress)
    else:
        reports = quantize_baseline(run, progress=progress)
    pareto = write_pareto(run.output_dir, reports) if len(reports) > 1 else None
    return reports, pareto


def quantize_checkpoint(
    model_path: str | Path,
    output_dir: str | Path,
    budget_bits: float | Sequence[float] = 2.0,
    progress: bool = True,
    **fields: Any,
) -> list[dict[str, Any]]:
    """Quantize the checkpoint at `model_path` (Hugging Face, converted) into `output_dir` and
    return the report of each budget (one output per budget, in `bpw_<budget>/` when several).

    `fields` are any config fields (`docs/quantizing.md`; nested ones as
    ``**{"distributed.num_processes": 2}``), validated like the command line's, e.g.
    ``quantize_checkpoint("Mixtral-8x7B", "out", 2.5, calib_text="my.txt", eval_text="")``.
    """
    budgets = (
        tuple(float(b) for b in budget_bits)
        if isinstance(budget_bits, Sequence)
        else (float(budget_bits),)
    )
    run = RunConfig.create(
        model_path=str(model_path), output_dir=str(output_dir), budget_bits=budgets, **fields
    )
    return run_quantization(run, progress=progress)[0]
