"""`python -m bitsmoe_jax.compare --config configs/tiny.py` — every method at matched effective
bits.

One run, one model, one calibration text, one evaluation text. For each target bpw and each method,
the method's setting nearest to the target (within ±0.05 when one exists; the table says which
setting was used and flags any outside the window; llama.cpp's K-quants, whose types are few, get
the smallest type with at least the target's bits) is quantized and evaluated against the
unquantized model: effective bpw (every stored bit over the original expert weights), perplexity,
KL, top-1 agreement, quantization wall time and its ratio to GPTQ's.

Baselines are calibrated like BitsMoE: layer by layer, the inputs of layer i coming from layers
0..i−1 already quantized, routing from the layer's own router.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bitsmoe_jax.baselines.kquants import check_contractions
from bitsmoe_jax.baselines.run import run_baseline
from bitsmoe_jax.config_cli import parse_config_args
from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.loading import load_model, model_config
from bitsmoe_jax.run.config_schema import METHODS, RunConfig, run_config
from bitsmoe_jax.run.driver import quantize
from bitsmoe_jax.run.inputs import calibration_tokens, evaluation_inputs
from bitsmoe_jax.run.pareto_plot import series_from_rows, write_pareto_png
from bitsmoe_jax.serve.quantized_checkpoint import load_quantized

TOLERANCE = 0.05


def run_bitsmoe(run: RunConfig, target: float, out_dir: Path) -> tuple[Any, dict]:
    """BitsMoE at one budget into `out_dir`, unevaluated: (the loaded quantized model, its row)."""
    c = run.replace(
        budget_bits=(float(target),), output_dir=str(out_dir), eval_text="", overwrite=True
    )
    (report,) = quantize(c, progress=False)
    model, _ = load_quantized(out_dir)
    return model, {
        "setting": f"budget {target}",
        "effective_bpw_experts": report["effective_bpw_experts"],
    }


def _measured(run: RunConfig, model, eval_ids, reference, quantize_time_s: float) -> dict[str, Any]:
    """The columns every row shares: quality against the reference on the evaluation tokens, and
    time."""
    res = evaluate_model(
        model,
        eval_ids,
        run.seq_len,
        run.seq_len,
        batch_size=run.eval_batch_size,
        reference=reference,
    )
    return {
        "perplexity": res["perplexity"],
        "perplexity_fp": res["reference_perplexity"],
        "kl_divergence": res["kl_divergence"],
        "top1_agreement": res["top1_agreement"],
        "quantize_time_s": quantize_time_s,
        "eval_tokens": res["tokens_scored"],
    }


def compare(
    run: RunConfig, methods: tuple[str, ...], targets: tuple[float, ...], progress: bool = True
) -> list[dict]:

    eval_ids, reference = evaluation_inputs(run)
    calib = jnp.asarray(
        calibration_tokens(
            run.model_path, run.calib_text, run.num_calib_tokens, run.seq_len, run.tokenizer
        )
    )
    rows = []
    for target in targets:
        for method in methods:
            t0 = time.time()
            if method == "bitsmoe":
                model, info = run_bitsmoe(
                    run, target, Path(run.output_dir) / "bitsmoe" / f"bpw_{target:.2f}"
                )
            else:
                model, _ = load_model(run.model_path)
                info = run_baseline(
                    method, model, calib, target, run.params.group_size, run.params.min_tokens
                )
            row = {
                "target_bpw": target,
                "method": method,
                **info,
                "within_tolerance": abs(info["effective_bpw_experts"] - target) <= TOLERANCE + 1e-9,
                **_measured(run, model, eval_ids, reference, time.time() - t0),
            }
            rows.append(row)
            if progress:
                print(
                    f"target {target:.2f} {method:10s} {info['setting']:>22s} bpw "
                    f"{row['effective_bpw_experts']:.3f} "
                    f"ppl {row['perplexity']:.2f} KL {row['kl_divergence']:.4f} top-1 "
                    f"{100 * row['top1_agreement']:.1f}% "
                    f"{row['quantize_time_s']:.1f}s",
                    flush=True,
                )
    for target in targets:
        gptq = [r for r in rows if r["target_bpw"] == target and r["method"] == "gptq"]
        for r in rows:
            if r["target_bpw"] == target:
                r["time_ratio_to_gptq"] = (
                    (r["quantize_time_s"] / gptq[0]["quantize_time_s"]) if gptq else None
                )
    return rows


ABLATIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "BitsMoE (defaults: SVD basis, token-sum output loss, floor 0.25, exact, whole-model "
        "budget, 4-bit bases, GPTQ-style rounding, per-expert scale fit 50 steps)",
        {},
    ),
    # the scale fit runs on the error feedback's calibration inputs: off with nearest rounding
    (
        "nearest rounding (no error feedback, no scale fit)",
        {"rounding": "nearest", "scale_tuning_steps": 0},
    ),
    ("activation-whitened basis", {"basis": "whitened"}),
    ("no basis (original weight columns)", {"basis": "none"}),
    ("per-expert means (no routing frequency)", {"loss_weighting": "expert_mean"}),
    ("expert_mass_floor 0", {"expert_mass_floor": 0.0}),
    ("expert_mass_floor 1", {"expert_mass_floor": 1.0}),
    ("sampled coefficients (kappa_b)", {"coefficient_mode": "sampled"}),
    ("per-layer budget (the default before 2026-12)", {"budget_scope": "layer"}),
    ("no per-expert scale fit (the default before 2026-12)", {"scale_tuning_steps": 0}),
    ("super experts (auto, 8 bits)", {"super_experts": "auto"}),
    ("6-bit bases", {"basis_bits": 6}),
    ("8-bit bases (the default before 2026-12)", {"basis_bits": 8}),
    ("bf16 bases", {"basis_bits": 16}),
    ("basis precision chosen per layer from 4, 6, 8 bits", {"basis_bits_choices": (4, 6, 8)}),
    (
        "decode budget (counts what a batch-1 step reads: bases E/k times)",
        {"budget_counts": "decode"},
    ),
    ("calibrated on Milton, floor 0.25", {"calib_text": "milton"}),
    ("calibrated on Milton, floor 0", {"calib_text": "milton", "expert_mass_floor": 0.0}),
    ("calibrated on Milton, floor 1", {"calib_text": "milton", "expert_mass_floor": 1.0}),
)


def ablations(run: RunConfig, target: float, progress: bool = True) -> list[dict]:
    """BitsMoE variants at one budget, all evaluated on the same tokens against the same
    reference."""

    eval_ids, reference = evaluation_inputs(run)
    rows = []
    for i, (name, overrides) in enumerate(ABLATIONS):
        c = run.replace(**overrides)
        t0 = time.time()
        model, info = run_bitsmoe(c, target, Path(run.output_dir) / "ablations" / f"{i:02d}")
        row = {
            "ablation": name,
            "overrides": overrides,
            "target_bpw": target,
            **info,
            **_measured(run, model, eval_ids, reference, time.time() - t0),
        }
        rows.append(row)
        if progress:
            print(
                f"{name:70s} bpw {row['effective_bpw_experts']:.3f} KL {row['kl_divergence']:.4f} "
                f"ppl {row['perplexity']:.2f}",
                flush=True,
            )
    return rows


def _table_head(title: str, command: str, machine: str, columns: list[str]) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def render_ablations(rows: list[dict], command: str, machine: str) -> str:
    lines = _table_head(
        "BitsMoE ablations",
        command,
        machine,
        ["variant", "effective bpw", "perplexity", "KL", "top-1", "quantize time (s)"],
    )
    for r in rows:
        lines.append(
            f"| {r['ablation']} | {r['effective_bpw_experts']:.3f} | {r['perplexity']:.2f} | "
            f"{r['kl_divergence']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {r['quantize_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def render(rows: list[dict], command: str, machine: str) -> str:
    lines = _table_head(
        "Side-by-side comparison",
        command,
        machine,
        [
            "target",
            "method",
            "setting",
            "effective bpw",
            "perplexity",
            "KL",
            "top-1",
            "quantize time (s)",
            "time / GPTQ",
        ],
    )
    for r in rows:
        flag = "" if r["within_tolerance"] else " (outside ±0.05)"
        ratio = f"{r['time_ratio_to_gptq']:.2f}" if r.get("time_ratio_to_gptq") is not None else "-"
        lines.append(
            f"| {r['target_bpw']:.2f} | {r['method']} | {r['setting']}{flag} | "
            f"{r['effective_bpw_experts']:.3f} | "
            f"{r['perplexity']:.2f} | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.1f}% "
            "| "
            f"{r['quantize_time_s']:.1f} | {ratio} |"
        )
    if rows:
        lines += [
            "",
            f"Unquantized perplexity {rows[0]['perplexity_fp']:.2f} over {rows[0]['eval_tokens']} "
            "tokens.",
        ]
    return "\n".join(lines) + "\n"


def _applicable(methods: tuple[str, ...], model_path: str, explicit: bool) -> tuple[str, ...]:
    """`methods` without K-quants where the model's expert shapes cannot take them: an error if
    they were asked for by name, a note if they came with the default list."""
    if "kquant" not in methods:
        return methods

    config = model_config(model_path)
    try:
        check_contractions(config.hidden_size, config.moe_intermediate_size)
    except ValueError as e:
        if explicit:
            raise
        print(f"note: kquant left out: {e}", file=sys.stderr)
        return tuple(m for m in methods if m != "kquant")
    return methods


def main(argv: list[str] | None = None) -> int:
    import platform

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, rest = parse_config_args(argv)
        methods, targets = METHODS, (2.0, 2.5, 3.0, 4.0)  # every method the quantize CLI knows
        run_ablations = explicit_methods = False
        for a in rest:
            if a == "--ablations":
                run_ablations = True
            elif a.startswith("--methods="):
                methods = tuple(m for m in a.split("=", 1)[1].split(",") if m)
                explicit_methods = True
            elif a.startswith("--targets="):
                targets = tuple(float(t) for t in a.split("=", 1)[1].split(",") if t)
            else:
                raise ValueError(
                    f"unexpected argument {a!r} (use --methods=a,b --targets=2.0,3.0 --ablations "
                    "--config.x=y)"
                )

        run = run_config(cfg)  # the one place the ConfigDict becomes typed and validated
        methods = _applicable(methods, run.model_path, explicit_methods)
    except (ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bitsmoe_jax.compare " + " ".join(argv)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} ({jax.default_backend()})"
    )
    if run_ablations:
        rows = ablations(run, targets[0])
        (out / "ablations.json").write_text(
            json.dumps(
                {"command": command, "machine": machine, "rows": rows}, indent=1, default=str
            )
        )
        (out / "ablations.md").write_text(render_ablations(rows, command, machine))
        print(f"wrote {out / 'ablations.md'}")
        return 0
    rows = compare(run, methods, targets)
    (out / "compare.json").write_text(
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1, default=str)
    )
    (out / "compare.md").write_text(render(rows, command, machine))
    print(f"wrote {out / 'compare.md'}")
    plot = write_pareto_png(
        out / "pareto.png", series_from_rows(rows), f"{Path(run.model_path).name}: every method"
    )
    if plot is not None:
        print(f"wrote {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
