"""`python -m bitsmoe_jax.compare --config configs/tiny.py` — every method at matched effective bits.

One run, one model, one calibration text, one evaluation text. For each target bpw and each method,
the method's setting nearest to the target (within ±0.05 when one exists; the table says which
setting was used and flags any outside the window) is quantized and evaluated against the
unquantized model: effective bpw (every stored bit over the original expert weights), perplexity,
KL, top-1 agreement, quantization wall time and its ratio to GPTQ's.

Baselines are calibrated like BitsMoE: layer by layer, the inputs of layer i coming from layers
0..i−1 already quantized, routing from the layer's own router.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.config_cli import parse_config_args
from bitsmoe_jax.data import load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.models.moe import Experts
from bitsmoe_jax.quant.pipeline import attention_part

BASELINE_BITS = (2, 3, 4, 5, 6, 8)
BASELINE_GROUPS = (16, 32, 64, 128, 256)
TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Setting:
    """One uniform-bits setting of a baseline: `bits` per weight plus a bf16 scale per group."""

    bits: int
    group_size: int
    bpw: float

    def label(self) -> str:
        return f"{self.bits}-bit g{self.group_size}"


def uniform_settings(contraction: int) -> list[Setting]:
    """All (bits, group) settings; a group never spans more than one row of `contraction` inputs."""
    out = []
    for b in BASELINE_BITS:
        for g in BASELINE_GROUPS:
            g_eff = min(g, contraction)
            out.append(Setting(b, g_eff, b + 16.0 / g_eff))
    return sorted(set(out), key=lambda s: (s.bpw, -s.bits))


def nearest_setting(settings: list[Setting], target: float) -> Setting:
    """Closest bpw to the target; ties go to more bits per weight (fewer scales)."""
    return min(settings, key=lambda s: (abs(s.bpw - target), -s.bits))


def sequential_quantize(model, calib: jnp.ndarray, quantize_layer: Callable[[int, Any, jnp.ndarray], None]) -> None:
    """Run calibration layer by layer, letting `quantize_layer(i, moe_block, moe_input[N, D])` replace
    the block's expert weights in place before the next layer's inputs are computed from it."""
    x = model.embed_tokens(calib)
    for i, layer in enumerate(model.layers):
        resid, moe_in = attention_part(layer, x, model.config)
        if layer.is_moe:
            quantize_layer(i, layer.mlp, moe_in.reshape(-1, moe_in.shape[-1]))
        x = resid + layer.mlp(moe_in)


def _set_experts(block, gate, up, down) -> None:
    ex: Experts = block.experts
    for var, w in ((ex.gate, gate), (ex.up, up), (ex.down, down)):
        var[...] = jnp.asarray(w, var.dtype)


def run_rtn(model, calib, setting: Setting) -> dict:
    from bitsmoe_jax.baselines.rtn import rtn_quantize

    def q(i, block, x):
        ex = block.experts
        _set_experts(block, *(rtn_quantize(np.asarray(w[...]), setting.bits, setting.group_size, axis=1) for w in (ex.gate, ex.up, ex.down)))

    sequential_quantize(model, calib, q)
    return {"setting": setting.label(), "effective_bpw_experts": setting.bpw}


def run_gptq(model, calib, setting: Setting, min_tokens: int) -> dict:
    from bitsmoe_jax.baselines.gptq import gptq_quantize_experts

    starved: dict[int, list[int]] = {}

    def q(i, block, x):
        _, w, idx = block.router(x)
        ex = block.experts
        out = gptq_quantize_experts(
            np.asarray(ex.gate[...]), np.asarray(ex.up[...]), np.asarray(ex.down[...]), x, idx, w,
            setting.bits, setting.group_size, min_tokens=min_tokens,
        )
        starved[i] = list(out["starved"])
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return {"setting": setting.label(), "effective_bpw_experts": setting.bpw, "starved_experts": starved}


def run_expertwise(model, calib, target: float, group_size: int) -> dict:
    from bitsmoe_jax.baselines.expertwise import expertwise_quantize

    bits, bpws = {}, []

    def q(i, block, x):
        ex = block.experts
        out = expertwise_quantize(
            np.asarray(ex.gate[...]), np.asarray(ex.up[...]), np.asarray(ex.down[...]),
            np.asarray(block.router.kernel[...]), target, group_size=group_size,
        )
        bits[i] = [int(b) for b in out["bits"]]
        bpws.append(float(out["bpw"]))
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return {"setting": f"per-expert bits g{group_size}", "effective_bpw_experts": float(np.mean(bpws)), "expert_bits": bits}


def run_bitsmoe(cfg, target: float, out_dir: Path) -> tuple[Any, dict]:
    from bitsmoe_jax.quant.checkpoint_io import load_quantized
    from bitsmoe_jax.quant.runner import quantize

    c = cfg.copy_and_resolve_references()
    c.budget_bits = (float(target),)
    c.output_dir = str(out_dir)
    c.eval_text = ""
    c.overwrite = True
    (report,) = quantize(c, progress=False)
    model, _ = load_quantized(out_dir)
    return model, {"setting": f"budget {target}", "effective_bpw_experts": report["effective_bpw_experts"]}


def compare(cfg, methods: tuple[str, ...], targets: tuple[float, ...], progress: bool = True) -> list[dict]:
    from bitsmoe_jax.quant.runner import calibration_tokens

    tok = load_tokenizer(cfg.model_path)
    eval_ids = tokenize_text(tok, read_text(cfg.eval_text))
    if cfg.eval_max_tokens:
        eval_ids = eval_ids[: int(cfg.eval_max_tokens)]
    calib = jnp.asarray(calibration_tokens(cfg.model_path, cfg.calib_text, cfg.num_calib_tokens, cfg.seq_len))
    reference, config = load_model(cfg.model_path)
    settings = uniform_settings(min(config.hidden_size, config.moe_intermediate_size))
    rows = []
    for target in targets:
        for method in methods:
            t0 = time.time()
            if method == "bitsmoe":
                model, info = run_bitsmoe(cfg, target, Path(cfg.output_dir) / "bitsmoe" / f"bpw_{target:.2f}")
            else:
                model, _ = load_model(cfg.model_path)
                if method == "rtn":
                    info = run_rtn(model, calib, nearest_setting(settings, target))
                elif method == "gptq":
                    info = run_gptq(model, calib, nearest_setting(settings, target), cfg.min_tokens)
                elif method == "expertwise":
                    info = run_expertwise(model, calib, target, cfg.group_size)
                else:
                    raise ValueError(f"unknown method {method!r}; choose from bitsmoe, rtn, gptq, expertwise")
            qtime = time.time() - t0
            res = evaluate_model(model, eval_ids, cfg.seq_len, cfg.seq_len, batch_size=cfg.eval_batch_size, reference=reference)
            row = {
                "target_bpw": target,
                "method": method,
                **info,
                "within_tolerance": abs(info["effective_bpw_experts"] - target) <= TOLERANCE + 1e-9,
                "perplexity": res["perplexity"],
                "perplexity_fp": res["reference_perplexity"],
                "kl_divergence": res["kl_divergence"],
                "top1_agreement": res["top1_agreement"],
                "quantize_time_s": qtime,
                "eval_tokens": res["tokens_scored"],
            }
            rows.append(row)
            if progress:
                print(
                    f"target {target:.2f} {method:10s} {info['setting']:>22s} bpw {row['effective_bpw_experts']:.3f} "
                    f"ppl {row['perplexity']:.2f} KL {row['kl_divergence']:.4f} top-1 {100 * row['top1_agreement']:.1f}% "
                    f"{qtime:.1f}s",
                    flush=True,
                )
    for target in targets:
        gptq = [r for r in rows if r["target_bpw"] == target and r["method"] == "gptq"]
        for r in rows:
            if r["target_bpw"] == target:
                r["time_ratio_to_gptq"] = (r["quantize_time_s"] / gptq[0]["quantize_time_s"]) if gptq else None
    return rows


def render(rows: list[dict], command: str, machine: str) -> str:
    lines = [
        "# Side-by-side comparison",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}",
        "",
        "| target | method | setting | effective bpw | perplexity | KL | top-1 | quantize time (s) | time / GPTQ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = "" if r["within_tolerance"] else " (outside ±0.05)"
        ratio = f"{r['time_ratio_to_gptq']:.2f}" if r.get("time_ratio_to_gptq") is not None else "-"
        lines.append(
            f"| {r['target_bpw']:.2f} | {r['method']} | {r['setting']}{flag} | {r['effective_bpw_experts']:.3f} | "
            f"{r['perplexity']:.2f} | {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['quantize_time_s']:.1f} | {ratio} |"
        )
    if rows:
        lines += ["", f"Unquantized perplexity {rows[0]['perplexity_fp']:.2f} over {rows[0]['eval_tokens']} tokens."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import platform

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, rest = parse_config_args(argv)
        methods, targets = ("bitsmoe", "rtn", "gptq", "expertwise"), (2.0, 2.5, 3.0, 4.0)
        for a in rest:
            if a.startswith("--methods="):
                methods = tuple(m for m in a.split("=", 1)[1].split(",") if m)
            elif a.startswith("--targets="):
                targets = tuple(float(t) for t in a.split("=", 1)[1].split(",") if t)
            else:
                raise ValueError(f"unexpected argument {a!r} (use --methods=a,b --targets=2.0,3.0 --config.x=y)")
        from bitsmoe_jax.quant.config_schema import validate

        validate(cfg)
    except (ValueError, FileNotFoundError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = compare(cfg, methods, targets)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bitsmoe_jax.compare " + " ".join(argv)
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores, JAX {__import__('jax').__version__} ({__import__('jax').default_backend()})"
    (out / "compare.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1, default=str))
    (out / "compare.md").write_text(render(rows, command, machine))
    print(f"wrote {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
