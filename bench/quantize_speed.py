"""Quantization time of one MoE layer at real dimensions: BitsMoE against our GPTQ baseline, side by
side in one run, on the same machine, checkpoint, calibration and thread count.

    python bench/quantize_speed.py [--dims qwen3-30b-a3b] [--tokens 4096] [--bits 2.0]
        [--work /tmp/bitsmoe_speed] [--quality | --quality-only]

A synthetic one-layer checkpoint at the expert dimensions of a real model (`bench/memory.py`'s
`REAL_DIMS`, random bf16 weights, written tensor by tensor) is quantized by the real command
(`python -m bitsmoe_jax.quantize`), each variant in its own subprocess one after the other:

* BitsMoE **default** (exact loss coefficients, GPTQ-style error-feedback rounding, MILP/greedy
  allocation as configured);
* BitsMoE **fast** (sampled coefficients, nearest rounding, greedy allocation: the paper's fast
  path);
* our **GPTQ** baseline (`--gptq-method`, default `gptq_asym`: per-expert Hessians over the routed
  tokens, 2-bit at the group size nearest the budget), streamed a chunk of experts at a time like
  BitsMoE.

Each row is the wall time of the whole command (start-up, checkpoint reading, calibration, every
stage, writing; compilation included for every method alike), its peak RSS, and the quantization
stages recorded in the output's `timings.json`. The ratios are GPTQ's wall time over each BitsMoE
variant's. No evaluation runs (it needs the unquantized model twice).

`--quality` adds the other half of the speed claim on the shipped model (`configs/tiny.py`): KL to
the unquantized model of the fast preset and of GPTQ at 2.0 and 2.5 bpw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import REAL_DIMS, gib  # noqa: E402  (bench/memory.py: the shared synthetic layers)

from bitsmoe_jax.peak_memory import measure  # noqa: E402
from conversion.synthetic import write_random_mixtral  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default": [],
    "fast": [
        "--config.coefficient_mode=sampled",
        "--config.rounding=nearest",
        "--config.scale_tuning_steps=0",
        "--config.allocator=greedy",
    ],
}


def write_layer(dims: dict, path: Path) -> None:
    if (path / "model.safetensors.index.json").is_file():
        return
    shutil.rmtree(path, ignore_errors=True)
    write_random_mixtral(
        path,
        1,
        dims["hidden"],
        dims["inter"],
        dims["experts"],
        shard_bytes=1 << 30,
        heads=dims["heads"],
        kv_heads=dims["kv_heads"],
        top_k=dims["top_k"],
    )


def run_args(model: Path, out: Path, tokens: int, bits: float, extra: list[str]) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.model_path={model}",
        f"--config.output_dir={out}",
        f"--config.budget_bits={bits}",
        "--config.eval_text=",
        f"--config.num_calib_tokens={tokens}",
        "--config.seq_len=256",
        "--config.overwrite=True",
        *extra,
    ]


def timed(model: Path, out: Path, tokens: int, bits: float, extra: list[str]) -> dict:
    """One quantize command in a fresh process: wall seconds, peak RSS and recorded stage times."""
    t = time.perf_counter()
    res = measure(run_args(model, out, tokens, bits, extra))
    wall = time.perf_counter() - t
    stages = json.loads((out / "timings.json").read_text())
    return {"wall_s": wall, "peak_rss_bytes": res["peak_rss_bytes"], "stages": stages}


def stage_line(stages: dict) -> str:
    times = stages.get("time_s", {})
    skip = ("total", "quantize_total", "shared", "budget")  # sums, not stages
    keep = {k: v for k, v in times.items() if k not in skip and v >= 0.05}
    return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(keep.items(), key=lambda kv: -kv[1]))


def speed(args: argparse.Namespace) -> None:
    dims = REAL_DIMS[args.dims]
    work = Path(args.work)
    model = work / args.dims
    write_layer(dims, model)
    print(
        f"{args.dims}: D={dims['hidden']} F={dims['inter']} E={dims['experts']} top-{dims['top_k']}"
        f", {args.tokens} calibration tokens, budget {args.bits} bpw, "
        f"{os.cpu_count()} CPUs, one process each, one after the other",
        flush=True,
    )
    rows = {}
    for name in args.variants:
        extra = [f"--config.method={args.gptq_method}"] if name == "gptq" else list(VARIANTS[name])
        rows[name] = timed(model, work / f"out_{name}", args.tokens, args.bits, extra)
        r = rows[name]
        print(
            f"  {name}: {r['wall_s']:.1f} s wall, peak {gib(r['peak_rss_bytes'])}; "
            f"{stage_line(r['stages'])}",
            flush=True,
        )
    print()
    print("| variant | wall (s) | peak RSS | GPTQ / this |")
    print("|---|---|---|---|")
    g = rows.get("gptq")
    for name, r in rows.items():
        ratio = f"{g['wall_s'] / r['wall_s']:.2f}×" if g else "–"
        print(f"| {name} | {r['wall_s']:.1f} | {gib(r['peak_rss_bytes'])} | {ratio} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def quality(args: argparse.Namespace) -> None:
    """KL of the fast preset and of GPTQ on the shipped model at 2.0 and 2.5 bpw."""
    work = Path(args.work) / "quality"
    print("\nshipped model (configs/tiny.py), KL to the unquantized model:")
    print("| bpw | BitsMoE fast | GPTQ |")
    print("|---|---|---|")
    kl: dict[str, dict[str, float]] = {}
    for name, extra in (
        ("fast", VARIANTS["fast"]),
        ("gptq", [f"--config.method={args.gptq_method}"]),
    ):
        out = work / name
        measure(
            [
                "--config",
                str(ROOT / "configs" / "tiny.py"),
                f"--config.output_dir={out}",
                "--config.budget_bits=(2.0, 2.5)",
                "--config.overwrite=True",
                *extra,
            ]
        )
        kl[name] = {
            b: json.loads((out / f"bpw_{b}" / "report.json").read_text())["kl_divergence"]
            for b in ("2.00", "2.50")
        }
    for b in ("2.00", "2.50"):
        print(f"| {b} | {kl['fast'][b]:.5f} | {kl['gptq'][b]:.5f} |")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="qwen3-30b-a3b", choices=sorted(REAL_DIMS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--bits", type=float, default=2.0)
    p.add_argument("--variants", nargs="+", default=["default", "fast", "gptq"])
    p.add_argument("--gptq-method", default="gptq_asym", choices=["gptq", "gptq_asym"])
    p.add_argument("--work", default="/tmp/bitsmoe_speed")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    p.add_argument("--quality", action="store_true", help="also the KL check on the shipped model")
    p.add_argument("--quality-only", action="store_true", help="only the KL check")
    args = p.parse_args()
    if not args.quality_only:
        speed(args)
    if args.quality or args.quality_only:
        quality(args)


if __name__ == "__main__":
    main()
