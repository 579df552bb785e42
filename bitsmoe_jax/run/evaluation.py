"""Quality of a written output against the unquantized model, into its report; its summary line."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.inputs import evaluation_inputs


def eval_metrics(run: RunConfig, model, shared: dict) -> dict[str, Any]:
    """Report metrics of `model` against the unquantized model on `run.eval_text`.

    `shared` carries the tokenized text and the reference model between the budgets of one run, so
    they are read once, not once per output.
    """

    if "ids" not in shared:
        shared["ids"], shared["ref"] = evaluation_inputs(run)
    res = evaluate_model(
        model,
        shared["ids"],
        run.seq_len,
        run.seq_len,
        batch_size=run.eval_batch_size,
        reference=shared["ref"],
    )
    return {
        "eval_text": str(run.eval_text),
        "eval_tokens": int(res["tokens_scored"]),
        "perplexity_fp": float(res["reference_perplexity"]),
        "perplexity_q": float(res["perplexity"]),
        "kl_divergence": float(res["kl_divergence"]),
        "top1_agreement": float(res["top1_agreement"]),
    }


def bitsmoe_report(
    run: RunConfig, budget: float, summary: dict[str, Any], layer_summary: dict[str, Any]
) -> dict[str, Any]:
    """A BitsMoE output's report before its evaluation: bits, layers, allocations, calibration."""
    report: dict[str, Any] = {
        "method": run.method,
        "model": str(run.model_path),
        "budget_bits": budget,
        **{k: v for k, v in summary.items() if k != "budget_bits"},
        "layers": layer_summary,
        "starved_experts": {
            i: s["starved_experts"] for i, s in layer_summary.items() if s["starved_experts"]
        },
        "super_experts": {
            i: s["super_experts"] for i, s in layer_summary.items() if s["super_experts"]
        },
        "allocation_gaps": {
            i: [a["gap"] for a in s["allocation"]] for i, s in layer_summary.items()
        },
        "calib_text": str(run.calib_text),
        "num_calib_tokens": int(run.num_calib_tokens),
    }
    return report


def finish_report(
    run: RunConfig,
    report: dict[str, Any],
    load_written: Callable[[], Any],
    timings: dict[str, float],
    shared: dict,
    log: Callable[[str], None] | None = None,
) -> None:
    """The last steps of every method's report: the quality of the written model (`load_written`
    reads it back) when `run.eval_text` is set, and the stage times with their totals.

    `time_s.total` is what this budget took including the work it shares with the run's other
    budgets (`time_s.shared`: the calibration and layer-by-layer quantization of a BitsMoE run);
    `time_s.budget` is its own part (allocation and packing at this budget, writing, evaluating),
    so a run's budgets add up: shared + Σ budget."""
    if run.eval_text:
        if log is not None:
            log(f"budget {report['budget_bits']:.2f}: evaluating on {run.eval_text} …")
        t = time.time()
        report.update(eval_metrics(run, load_written(), shared))
        timings["evaluate"] = time.time() - t
    report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
    total = sum(v for k, v in timings.items() if k in ("quantize_total", "write", "evaluate"))
    report["time_s"]["total"] = round(total, 3)
    report["time_s"]["budget"] = round(total - timings.get("shared", 0.0), 3)


def budget_seconds(report: dict) -> tuple[float, float]:
    """(this budget's own seconds, seconds shared with the run's other budgets) of a report
    (reports written before the split count everything as their own)."""
    t = report["time_s"]
    shared = float(t.get("shared", 0.0))
    return float(t.get("budget", t["total"] - shared)), shared


def run_time_line(reports: list[dict], wall_s: float) -> str:
    """How a run's wall time splits: the shared work, each budget's own, and the rest (start-up,
    the pre-flight check, reading the evaluation text once); e.g. ``done in 107.3 s: shared
    quantization 26.5 s + budgets 22.4 + 26.7 + 27.7 s + start-up and checks 4.0 s``."""
    own = [budget_seconds(r)[0] for r in reports]
    shared = max((budget_seconds(r)[1] for r in reports), default=0.0)
    rest = wall_s - shared - sum(own)
    parts = [f"shared quantization {shared:.1f} s"] if shared else []
    parts.append(
        ("budgets " if len(own) > 1 else "budget ") + " + ".join(f"{b:.1f}" for b in own) + " s"
    )
    if rest >= 0.05:
        parts.append(f"start-up and checks {rest:.1f} s")
    else:  # resumed: the committed layers' time was spent by an earlier run
        parts.append("the rest by an earlier run this one resumed")
    return f"done in {wall_s:.1f} s: " + " + ".join(parts)


def print_summary(report: dict) -> str:
    parts = [
        f"{report['budget_bits']:.2f} bpw budget → {report['effective_bpw_experts']:.3f} effective "
        "bpw (experts)"
    ]
    if "kl_divergence" in report:
        parts.append(
            f"ppl {report['perplexity_fp']:.2f} → {report['perplexity_q']:.2f}, KL "
            f"{report['kl_divergence']:.4f}, "
            f"top-1 {100 * report['top1_agreement']:.1f}%"
        )
    own, shared = budget_seconds(report)
    parts.append(f"{own:.1f} s" + (f" (+ {shared:.1f} s shared by the budgets)" if shared else ""))
    return " | ".join(parts)
