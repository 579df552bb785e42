"""Run the quantization end to end from a config: stream layers, quantize, write, evaluate, report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.checkpoint import atomic_directory
from bitsmoe_jax.data import load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import build_layer, iter_model_parts, load_model, model_config
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock
from bitsmoe_jax.quant import checkpoint_io
from bitsmoe_jax.quant.coefficients import PROJECTIONS
from bitsmoe_jax.quant.pipeline import (
    LayerProblem,
    allocate_layers,
    attention_part,
    bits_histogram,
    build_problem,
    pack_layer,
    stage_timer,
)
from bitsmoe_jax.quant.qmoe import QuantizedExperts
from bitsmoe_jax.quant.report import write_report
from conversion.convert import TOKENIZER_FILES



def calibration_tokens(model_path: str, text: str, num_tokens: int, seq_len: int) -> np.ndarray:
    """[n, seq_len] windows spread evenly over the calibration text (deterministic)."""
    ids = tokenize_text(load_tokenizer(model_path), read_text(text))
    n = max(1, num_tokens // seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"calibration text {text!r} has {len(ids)} tokens, fewer than seq_len={seq_len}")
    starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32)


def _strip_experts(layer_params: dict) -> dict:
    dense = {k: v for k, v in layer_params.items() if k != "mlp"}
    if "mlp" in layer_params:
        dense["mlp"] = {k: v for k, v in layer_params["mlp"].items() if k != "experts"}
    return dense


def _to_dtype(tree: Any, dtype: str) -> Any:
    from conversion.convert import np_dtype

    dt = np_dtype(dtype)
    return jax.tree.map(lambda a: np.asarray(a).astype(dt), tree)


def _budget_dirs(cfg: Any) -> list[tuple[float, Path]]:
    budgets = cfg.budget_bits if isinstance(cfg.budget_bits, (tuple, list)) else (cfg.budget_bits,)
    out = Path(cfg.output_dir)
    if len(budgets) == 1:
        return [(float(budgets[0]), out)]
    return [(float(b), out / f"bpw_{float(b):.2f}") for b in budgets]


def quantize(cfg: Any, progress: bool = True) -> list[dict[str, Any]]:
    """Quantize `cfg.model_path` at every budget of `cfg.budget_bits`; returns the reports."""
    from tqdm.auto import tqdm

    t_start = time.time()
    config = model_config(cfg.model_path)
    if not config.moe_layers:
        raise ValueError(f"{cfg.model_path}: the model has no MoE layers to quantize")
    budgets = _budget_dirs(cfg)
    for _, d in budgets:
        if d.exists() and not cfg.overwrite:
            raise FileExistsError(f"{d}: output exists (set --config.overwrite=True to replace it)")
    timings = stage_timer()
    t = time.time()
    calib = jnp.asarray(calibration_tokens(cfg.model_path, cfg.calib_text, cfg.num_calib_tokens, cfg.seq_len))
    timings["tokenize"] += time.time() - t

    keep_problems = len(budgets) > 1 or cfg.budget_scope == "model"
    problems: list[LayerProblem] = []
    dense_layers: dict[int, dict] = {}
    packed: dict[float, dict[int, tuple[QuantizedExperts, dict]]] = {b: {} for b, _ in budgets}
    first_budget = budgets[0][0]
    top = None
    x = None
    parts = iter_model_parts(cfg.model_path)
    bar = tqdm(total=config.num_hidden_layers, desc="quantize", unit="layer", disable=not progress)
    for name, part in parts:
        if name == "top":
            top = part
            x = jnp.take(jnp.asarray(part["embed_tokens"]["embedding"]), calib, axis=0)
            continue
        i = int(name)
        t = time.time()
        layer = build_layer(config, i, part)
        resid, moe_in = attention_part(layer, x, config)
        timings["forward"] += time.time() - t
        dense_layers[i] = _to_dtype(_strip_experts(part), cfg.dense_dtype)
        if not layer.is_moe:
            x = resid + layer.mlp(moe_in)
            bar.update(1)
            continue
        block: MoEBlock = layer.mlp
        flat = moe_in.reshape(-1, config.hidden_size)
        problem = build_problem(i, block, flat, cfg, config, timings)
        if cfg.budget_scope == "layer":
            t = time.time()
            bits, allocs = allocate_layers([problem], first_budget, "layer", _alloc_kw(cfg))[i]
            timings["allocation"] += time.time() - t
            t = time.time()
            qe = pack_layer(problem, bits)
            timings["pack"] += time.time() - t
            packed[first_budget][i] = (qe, {"bits": bits, "allocations": allocs, "problem": _problem_summary(problem)})
            propagate = qe if cfg.sequential else None
        else:
            propagate = None  # model scope: layers are only known together; calibrate on the original outputs
        if keep_problems:
            problems.append(problem)
        if propagate is not None:
            block.experts = propagate
        t = time.time()
        x = resid + block(moe_in)
        timings["forward"] += time.time() - t
        bar.set_postfix({k: f"{v:.1f}s" for k, v in timings.items()})
        bar.update(1)
    bar.close()

    # Other budgets / model scope: re-solve only the allocation.
    for b, _ in budgets:
        if cfg.budget_scope == "layer" and b == first_budget:
            continue
        t = time.time()
        sol = allocate_layers(problems, b, cfg.budget_scope, _alloc_kw(cfg))
        timings["allocation"] += time.time() - t
        t = time.time()
        for p in problems:
            bits, allocs = sol[p.index]
            packed[b][p.index] = (pack_layer(p, bits), {"bits": bits, "allocations": allocs, "problem": _problem_summary(p)})
        timings["pack"] += time.time() - t

    calib_time = time.time() - t_start
    reports = []
    shared: dict = {}  # evaluation tokens and reference model, read once for all budgets
    for b, out_dir in budgets:
        reports.append(
            _write_output(cfg, config, b, out_dir, top, dense_layers, packed[b], dict(timings), calib_time, shared)
        )
    return reports


def _alloc_kw(cfg: Any) -> dict[str, Any]:
    return {"allocator": cfg.allocator, "milp_max_units": cfg.milp_max_units, "time_limit": cfg.milp_time_limit}


def _problem_summary(p: LayerProblem) -> dict[str, Any]:
    return {
        "starved_experts": list(p.stats.starved),
        "tokens_per_expert": p.stats.tokens.tolist(),
        "super_experts": list(p.super_experts),
        "rank": {q: p.rank(q) for q in PROJECTIONS},
        "full_rank_units": {q: p.num_experts * p.rank(q) for q in PROJECTIONS},
        "num_weights": p.num_weights,
    }


def _write_output(cfg, config: ModelConfig, budget: float, out_dir: Path, top, dense_layers, layer_results, timings, calib_time, shared: dict) -> dict:
    t = time.time()
    expert_bits = 0
    expert_weights = 0
    layers_meta: dict[int, Any] = {}
    layer_summary = {}
    with atomic_directory(out_dir, overwrite=cfg.overwrite) as tmp:
        checkpoint_io.save_top(tmp, _to_dtype(top, cfg.dense_dtype))
        for i in range(config.num_hidden_layers):
            qe, info = layer_results.get(i, (None, None))
            meta = checkpoint_io.save_layer(tmp, i, dense_layers[i], qe, info["bits"] if info else None)
            if qe is not None:
                layers_meta[i] = meta
                sb = qe.stored_bits()
                expert_bits += sb
                expert_weights += info["problem"]["num_weights"]
                allocs = info["allocations"]
                layer_summary[str(i)] = {
                    **info["problem"],
                    "stored_bits": sb,
                    "bpw": sb / info["problem"]["num_weights"],
                    "bits_histogram": bits_histogram(info["bits"], cfg.candidate_bits),
                    "kept_components": {q: sum(m.seg_sizes) // qe.num_experts for q, m in zip(PROJECTIONS, qe.meta)},
                    "allocation": [
                        {"solver": a.solver, "objective": a.objective, "lower_bound": a.lower_bound, "gap": a.gap, "time_s": a.time_s}
                        for a in allocs
                    ],
                }
        src = Path(cfg.model_path)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        total_params, dense_bits = _dense_accounting(top, dense_layers, cfg.dense_dtype)
        summary = {
            "budget_bits": budget,
            "effective_bpw_experts": expert_bits / max(expert_weights, 1),
            "effective_bpw_model": (expert_bits + dense_bits) / (total_params + expert_weights),
            "expert_stored_bits": expert_bits,
            "expert_weights": expert_weights,
        }
        checkpoint_io.write_meta(tmp, config, cfg.to_dict(), layers_meta, summary)
        timings = dict(timings)
        timings["write"] = time.time() - t
        report = _evaluate_into_report(cfg, tmp, budget, summary, layer_summary, timings, calib_time, shared)
        write_report(tmp, report)
    return report


def _dense_accounting(top: dict, dense_layers: dict, dtype: str) -> tuple[int, int]:
    leaves = jax.tree.leaves(top) + jax.tree.leaves(dense_layers)
    n = int(sum(np.size(a) for a in leaves))
    bits = 16 if dtype in ("bfloat16", "float16") else 32
    return n, n * bits


def _eval_metrics(cfg: Any, model, shared: dict) -> dict[str, Any]:
    """Report metrics of `model` against the unquantized model on `cfg.eval_text`.

    `shared` carries the tokenized text and the reference model between the budgets of one run, so
    they are read once, not once per output.
    """
    from bitsmoe_jax.evaluate import evaluate_model

    if "ids" not in shared:
        ids = tokenize_text(load_tokenizer(cfg.model_path), read_text(cfg.eval_text))
        shared["ids"] = ids[: int(cfg.eval_max_tokens)] if cfg.eval_max_tokens else ids
        shared["ref"] = load_model(cfg.model_path)[0]
    res = evaluate_model(model, shared["ids"], cfg.seq_len, cfg.seq_len, batch_size=cfg.eval_batch_size, reference=shared["ref"])
    return {
        "eval_text": str(cfg.eval_text),
        "eval_tokens": int(res["tokens_scored"]),
        "perplexity_fp": float(res["reference_perplexity"]),
        "perplexity_q": float(res["perplexity"]),
        "kl_divergence": float(res["kl_divergence"]),
        "top1_agreement": float(res["top1_agreement"]),
    }


def _evaluate_into_report(cfg, qdir: Path, budget, summary, layer_summary, timings, calib_time, shared: dict) -> dict:
    report: dict[str, Any] = {
        "method": cfg.method,
        "model": str(cfg.model_path),
        "budget_bits": budget,
        **{k: v for k, v in summary.items() if k != "budget_bits"},
        "layers": layer_summary,
        "starved_experts": {i: s["starved_experts"] for i, s in layer_summary.items() if s["starved_experts"]},
        "super_experts": {i: s["super_experts"] for i, s in layer_summary.items() if s["super_experts"]},
        "allocation_gaps": {i: [a["gap"] for a in s["allocation"]] for i, s in layer_summary.items()},
        "calib_text": str(cfg.calib_text),
        "num_calib_tokens": int(cfg.num_calib_tokens),
    }
    if cfg.eval_text:
        t = time.time()
        report.update(_eval_metrics(cfg, checkpoint_io.load_quantized(qdir)[0], shared))
        timings["evaluate"] = time.time() - t
    timings["quantize_total"] = calib_time
    report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["time_s"]["total"] = round(sum(v for k, v in timings.items() if k in ("quantize_total", "write", "evaluate")), 3)
    return report


def print_summary(report: dict) -> str:
    parts = [f"{report['budget_bits']:.2f} bpw budget → {report['effective_bpw_experts']:.3f} effective bpw (experts)"]
    if "kl_divergence" in report:
        parts.append(
            f"ppl {report['perplexity_fp']:.2f} → {report['perplexity_q']:.2f}, KL {report['kl_divergence']:.4f}, "
            f"top-1 {100 * report['top1_agreement']:.1f}%"
        )
    parts.append(f"{report['time_s']['total']:.1f} s")
    return " | ".join(parts)


def quantize_baseline(cfg: Any, progress: bool = True) -> list[dict[str, Any]]:
    """RTN / GPTQ / expert-wise at each budget, calibrated like BitsMoE, written with the same report.

    The checkpoint keeps the dequantized expert weights (float32, exact values of codes × scales) in
    the converted format, so `load_model` and `evaluate` read it directly; its effective bpw counts
    what the method stores (integer codes and bf16 group scales), not the float32 container.
    """
    import jax as _jax
    from flax import nnx

    from bitsmoe_jax.baselines.run import run_baseline
    from bitsmoe_jax.checkpoint import FORMAT_CONVERTED, META_FILE, save_tree

    budgets = _budget_dirs(cfg)
    for _, d in budgets:
        if d.exists() and not cfg.overwrite:
            raise FileExistsError(f"{d}: output exists (set --config.overwrite=True to replace it)")
    calib = jnp.asarray(calibration_tokens(cfg.model_path, cfg.calib_text, cfg.num_calib_tokens, cfg.seq_len))
    config = model_config(cfg.model_path)
    reports = []
    shared: dict = {}
    for budget, out_dir in budgets:
        t0 = time.time()
        model, _ = load_model(cfg.model_path)
        info = run_baseline(cfg.method, model, calib, budget, cfg.group_size, cfg.min_tokens)
        qtime = time.time() - t0
        pure = _jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        layers = pure.pop("layers")
        expert_weights = 3 * config.num_experts * config.hidden_size * config.moe_intermediate_size * len(config.moe_layers)
        with atomic_directory(out_dir, overwrite=cfg.overwrite) as tmp:
            save_tree(tmp / "params" / "top", _to_dtype(pure, cfg.dense_dtype))
            dense_params = 0
            for i in range(config.num_hidden_layers):
                part = layers[i]
                dense = _to_dtype(_strip_experts(part), cfg.dense_dtype)
                dense_params += int(sum(np.size(a) for a in _jax.tree.leaves(dense)))
                if "mlp" in part and "experts" in part["mlp"]:
                    dense.setdefault("mlp", {})["experts"] = _to_dtype(part["mlp"]["experts"], "float32")
                save_tree(tmp / "params" / f"layer_{i:03d}", dense)
            src = Path(cfg.model_path)
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copy(src / f, tmp / f)
            top_params = int(sum(np.size(a) for a in _jax.tree.leaves(pure)))
            dense_bits = (top_params + dense_params) * (16 if cfg.dense_dtype in ("bfloat16", "float16") else 32)
            bpw = float(info["effective_bpw_experts"])
            summary = {
                "budget_bits": budget,
                "effective_bpw_experts": bpw,
                "effective_bpw_model": (bpw * expert_weights + dense_bits) / (expert_weights + top_params + dense_params),
                "expert_weights": expert_weights,
            }
            meta = {
                "format": FORMAT_CONVERTED,
                "version": 1,
                "dtype": "float32",
                "config": json.loads(config.to_json()),
                "quantization": {"method": cfg.method, **{k: v for k, v in info.items()}, **summary},
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            report: dict[str, Any] = {
                "method": cfg.method, "model": str(cfg.model_path), **summary, "setting": info["setting"],
                "layers": {}, "starved_experts": info.get("starved_experts", {}), "super_experts": {},
                "allocation_gaps": {}, "calib_text": str(cfg.calib_text), "num_calib_tokens": int(cfg.num_calib_tokens),
            }
            timings = {"quantize_total": qtime}
            if cfg.eval_text:
                t = time.time()
                stored, _ = load_model(tmp)  # evaluate what was written (dense weights at dense_dtype)
                report.update(_eval_metrics(cfg, stored, shared))
                timings["evaluate"] = time.time() - t
            report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
            report["time_s"]["total"] = round(sum(timings.values()), 3)
            write_report(tmp, report)
        reports.append(report)
    return reports
