"""Bytes a decode step reads per token per MoE layer: our written checkpoints beside GPTQ w2g128,
llama.cpp IQ2_XXS / Q2_K and bf16 experts.

    python bench/decode_bytes.py DIR [DIR ...] [--batch 1 64] [--json OUT]
    python bench/decode_bytes.py --layout deepseek-v3:7168:2048:256:8:2.14[:4]   # no checkpoint

Why: decode is bound by the bytes it reads, and storage bpw hides what a step reads. A BitsMoE
layer reads its shared bases whole for every step (every token uses them) plus the packed factors
of the experts the step's tokens are routed to; an expert-wise format (GPTQ, llama.cpp, bf16)
reads only the routed experts. At batch 1 the bases are paid by one token; at batch B by the
expected number of distinct experts the B tokens reach.

Ours are counted from the arrays of each written checkpoint (DIR is a quantized checkpoint): the
bases' codes and scales whole, and for each expert its rows of every bit-width segment — packed
words, bf16 group scales, 16-bit values — and its entries of the permutation that says where its
rows are. The others are their layouts' bits per weight times the routed experts' weights:

- GPTQ w2g128: 2-bit codes, per 128 weights an fp16 scale and a 2-bit zero point: 2.140625 bpw;
- llama.cpp IQ2_XXS: 66 bytes per 256 weights (2.0625 bpw); Q2_K: 84 bytes per 256 (2.625 bpw);
- bf16: 16 bpw.

Routing is taken as uniform (each token reaches k of E experts, independently): batch 1 reads k
experts on average; batch B reads E·(1 − (1 − k/E)^B) distinct experts on average. The router and
any shared experts are read alike by every format and are left out. Every MoE layer of a
checkpoint is counted; the table gives the mean over its MoE layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bitsmoe_jax.io.checkpoint import load_tree
from bitsmoe_jax.method.decompose import basis_stored_bits
from bitsmoe_jax.serve.quantized_checkpoint import load_layer_experts, read_meta
from bitsmoe_jax.serve.read_bytes import LAYOUT_BPW, layer_read_bytes, per_token_bytes


def checkpoint_rows(path: Path, batches: list[int]) -> dict[str, Any]:
    """The bytes per token of checkpoint `path` and of the other layouts at its dimensions, the
    mean over its MoE layers."""
    meta = read_meta(path)
    cfg = meta["config"]
    d, f = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"])
    e_count, k = int(cfg["num_experts"]), int(cfg["num_experts_per_tok"])
    layers = sorted(int(i) for i in meta["layers"])
    bases, per_layer = [], []
    for i in layers:
        tree = load_tree(path / "params" / f"layer_{i:03d}")
        b, per_expert = layer_read_bytes(
            load_layer_experts(path, i, tree["experts_q"], meta["layers"][str(i)]),
            meta["layers"][str(i)],
        )
        bases.append(b)
        per_layer.append(per_token_bytes(b, per_expert, 3 * d * f, k, tuple(batches)))
    return {
        "checkpoint": str(path),
        "dims": {"hidden": d, "inter": f, "experts": e_count, "top_k": k},
        "moe_layers": len(layers),
        "effective_bpw_experts": float(meta["summary"]["effective_bpw_experts"]),
        "bases_bytes": float(np.mean(bases)),
        "batches": {
            str(b): {
                name: float(np.mean([layer[str(b)][name] for layer in per_layer]))
                for name in per_layer[0][str(b)]
            }
            for b in batches
        },
    }


def layout_row(spec: str, batches: list[int]) -> dict[str, Any]:
    """Our bytes per token from the layout alone, for dims with no written checkpoint:
    spec "NAME:D:F:E:K:BPW[:BASIS_BITS]" (basis bits 4 by default, the run's default). The stored
    bits are BPW × E × 3·D·F (the effective bpw counts the permutation at ceil(log2 K) bits an
    entry; a step reads its int32 container); the bases are full rank, stored as
    `decompose.basis_stored_bits` counts them (an upper bound: dropped components shrink them);
    the rest is spread evenly over the experts."""
    name, *nums = spec.split(":")
    d, f, e_count, k = (int(v) for v in nums[:4])
    bpw = float(nums[4])
    basis_bits = int(nums[5]) if len(nums) > 5 else 4
    rank = min(d, e_count * f)
    units = e_count * rank  # per projection
    bases = 3 * basis_stored_bits(d, rank, basis_bits) / 8
    perm_excess = 3 * units * (32 - int(np.ceil(np.log2(units)))) / 8
    experts_total = bpw * e_count * 3 * d * f / 8 - bases + perm_excess
    per_expert = np.full(e_count, experts_total / e_count)
    return {
        "checkpoint": f"{name} (layout)",
        "dims": {"hidden": d, "inter": f, "experts": e_count, "top_k": k},
        "moe_layers": 1,
        "effective_bpw_experts": bpw,
        "bases_bytes": float(bases),
        "batches": per_token_bytes(bases, per_expert, 3 * d * f, k, tuple(batches)),
    }


def _unit(rows: list[dict[str, Any]]) -> tuple[str, float]:
    """MiB, or KiB when every number is below a MiB (small models)."""
    top = max(v for r in rows for b in r["batches"].values() for v in b.values())
    return ("MiB", 2.0**20) if top >= 2**20 else ("KiB", 2.0**10)


def markdown(rows: list[dict[str, Any]], batches: list[int]) -> str:
    names = list(LAYOUT_BPW)
    unit, div = _unit(rows)

    def fmt(n: float) -> str:
        return f"{n / div:.2f}"

    head = "| checkpoint (D × F, E, top-k) | ours bpw | batch | bases | BitsMoE | " + " | ".join(
        names
    )
    lines = [
        head + " | BitsMoE / GPTQ w2g128 |",
        "|" + "---|" * (6 + len(names)),
    ]
    for r in rows:
        dm = r["dims"]
        path = Path(r["checkpoint"])
        name = f"{path.parent.name}/{path.name}" if path.name.startswith("bpw_") else path.name
        label = f"{name} ({dm['hidden']} × {dm['inter']}, {dm['experts']}, {dm['top_k']})"
        for batch in batches:
            b = r["batches"][str(batch)]
            cells = " | ".join(fmt(b[n]) for n in names)
            lines.append(
                f"| {label} | {r['effective_bpw_experts']:.3f} | {batch} | "
                f"{fmt(r['bases_bytes'] / batch)} | {fmt(b['bitsmoe'])} | {cells} | "
                f"{b['bitsmoe'] / b['GPTQ w2g128']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", help="quantized checkpoint directories")
    ap.add_argument(
        "--layout",
        nargs="*",
        default=[],
        metavar="NAME:D:F:E:K:BPW",
        help="also rows from the layout alone, for dims with no written checkpoint",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    rows = [checkpoint_rows(Path(c), a.batch) for c in a.checkpoints]
    rows += [layout_row(spec, a.batch) for spec in a.layout]
    if not rows:
        ap.error("give quantized checkpoint directories, --layout specs, or both")
    print(
        f"{_unit(rows)[0]} read per token per MoE layer (bases: our shared bases' share of it; "
        "mean over the MoE layers)"
    )
    print(markdown(rows, a.batch))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
