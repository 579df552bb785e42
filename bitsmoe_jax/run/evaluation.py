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
) -> None:
    """The last steps of every method's report: the quality of the written model (`load_written`
    reads it back) when `run.eval_text` is set, and the stage times with their total."""
    if run.eval_text:
        t = time.time()
        report.update(eval_metrics(run, load_written(), shared))
        timings["evaluate"] = time.time() - t
    report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["time_s"]["total"] = round(
        sum(v for k, v in timings.items() if k in ("quantize_total", "write", "evaluate")), 3
    )


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
    parts.append(f"{report['time_s']['total']:.1f} s")
    return " | ".join(parts)
