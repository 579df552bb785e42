"""report.json and a human-readable report.md for one quantized output."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bitsmoe_jax.run.pareto_plot import series_from_rows, write_pareto_png

TIMINGS_FILE = "timings.json"
TIMING_KEYS = ("time_s", "allocation_time_s")


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# BitsMoE quantization report — {r['model']}",
        "",
        f"Method `{r['method']}`, budget {r['budget_bits']} bits per expert weight ("
        + (
            "what a batch-1 decode step reads per routed expert weight)."
            if r.get("budget_counts") == "decode"
            else "everything stored counted)."
        ),
        "",
        "| metric | value |",
        "|---|---|",
        f"| effective bpw (experts, bases included) | {_fmt(r['effective_bpw_experts'])} |",
        f"| effective bpw (whole model) | {_fmt(r['effective_bpw_model'])} |",
    ]
    for batch, row in r.get("decode_bytes_per_token", {}).items():
        lines.append(
            f"| MoE bytes read per decoded token, batch {batch} | "
            f"{row['bitsmoe'] / 2**20:.3f} MiB (GPTQ w2g128 layout: "
            f"{row['GPTQ w2g128'] / 2**20:.3f} MiB, bf16: {row['bf16'] / 2**20:.3f} MiB) |"
        )
    for k, label in (
        ("perplexity_fp", "perplexity, unquantized"),
        ("perplexity_q", "perplexity, quantized"),
        ("kl_divergence", "KL(unquantized ‖ quantized), nats/token"),
        ("top1_agreement", "top-1 agreement"),
        ("eval_tokens", "evaluation tokens"),
    ):
        if k in r:
            lines.append(f"| {label} | {_fmt(r[k])} |")
    lines += [
        "",
        f"Stage timings (seconds) are in `{TIMINGS_FILE}`, apart from this report so that reruns "
        "compare equal.",
        "",
    ]
    lines += [
        "",
        "## Layers",
        "",
        "| layer | bpw | kept components (g/u/d) | bits histogram | starved experts | solver gap |",
        "|---|---|---|---|---|---|",
    ]
    for i, s in r["layers"].items():
        kept = "/".join(str(s["kept_components"][p]) for p in ("gate", "up", "down"))
        hist = ", ".join(f"{b}b:{n}" for b, n in s["bits_histogram"].items() if n)
        gaps = ", ".join(f"{a['gap']:.1e}" for a in s["allocation"]) or "-"
        lines.append(
            f"| {i} | {s['bpw']:.3f} | {kept} | {hist} | {s['starved_experts'] or '-'} | {gaps} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """report.json / report.md (deterministic) and timings.json (the run's `TIMING_KEYS`).

    Timings vary from run to run; keeping them out of report.json makes two runs of the same command
    (a resumed one included) produce byte-identical reports.
    """
    default = lambda o: o.item() if hasattr(o, "item") else str(o)  # noqa: E731
    stable = {k: v for k, v in report.items() if k not in TIMING_KEYS}
    (out_dir / "report.json").write_text(json.dumps(stable, indent=1, default=default))
    (out_dir / "report.md").write_text(render_markdown(stable))
    (out_dir / TIMINGS_FILE).write_text(
        json.dumps({k: report[k] for k in TIMING_KEYS if k in report}, indent=1, default=default)
    )


def write_pareto(output_dir: str | Path, reports: list[dict[str, Any]]) -> Path:
    """One table over the budgets of a multi-budget run (`OUTPUT_DIR/pareto.md` and `.json`), and
    its plot (`pareto.png`, KL against bpw) when the run evaluated."""
    out = Path(output_dir)
    keys = (
        "budget_bits",
        "effective_bpw_experts",
        "effective_bpw_model",
        "perplexity_q",
        "kl_divergence",
        "top1_agreement",
    )
    rows = [{k: r.get(k) for k in keys} for r in reports]
    lines = [
        "| budget | bpw experts | bpw model | perplexity | KL | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            " | ".join(["", *(_fmt(r[k]) if r[k] is not None else "-" for k in keys), ""]).strip()
        )
    _write_atomic(out / "pareto.json", json.dumps(rows, indent=1))
    _write_atomic(out / "pareto.md", "\n".join(lines) + "\n")
    # the plot needs the evaluation's KL (no eval_text: the tables only)
    model = Path(str(reports[0].get("model", ""))).name if reports else ""
    write_pareto_png(
        out / "pareto.png",
        series_from_rows(reports),
        f"{model}: {reports[0].get('method', 'bitsmoe')} at {len(reports)} budgets".lstrip(": "),
    )
    return out / "pareto.md"


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename, so that a kill never leaves a half-written table."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
