"""The baselines' run: RTN / GPTQ / expert-wise / K-quants at each budget, calibrated like BitsMoE,
written with the same report."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.baselines.kquants import check_contractions
from bitsmoe_jax.baselines.run import run_baseline
from bitsmoe_jax.io.checkpoint import FORMAT_CONVERTED, META_FILE, save_tree
from bitsmoe_jax.loading import load_model, model_config
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.run.budgets import budget_dirs
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.inputs import calibration_tokens
from bitsmoe_jax.run.outputs import (
    WrittenBody,
    dense_bits,
    num_params,
    strip_experts,
    to_dtype,
    write_output,
)


def quantize_baseline(run: RunConfig, progress: bool = True) -> list[dict[str, Any]]:
    """RTN / GPTQ / expert-wise / K-quants at each budget, calibrated like BitsMoE, written with the
    same report.

    The checkpoint keeps the dequantized expert weights (float32, exact values of codes × scales) in
    the converted format, so `load_model` and `evaluate` read it directly; its effective bpw counts
    what the method stores (integer codes and their scales: bf16 per group, or the K-quants' integer
    sub-block scales and fp16 factors), not the float32 container.
    """
    budgets = budget_dirs(run)
    for _, d in budgets:
        if d.exists() and not run.overwrite:
            raise FileExistsError(f"{d}: output exists (set --config.overwrite=True to replace it)")
    config = model_config(run.model_path)
    if (
        run.method == "kquant"
    ):  # before any work: a model K-quants cannot store is an error, not a late crash
        check_contractions(config.hidden_size, config.moe_intermediate_size)
    calib = jnp.asarray(
        calibration_tokens(run.model_path, run.calib_text, run.num_calib_tokens, run.seq_len)
    )
    reports = []
    shared: dict = {}
    expert_weights = (
        3
        * config.num_experts
        * config.hidden_size
        * config.moe_intermediate_size
        * len(config.moe_layers)
    )
    for budget, out_dir in budgets:
        t0 = time.time()
        model, _ = load_model(run.model_path)
        info = run_baseline(
            run.method, model, calib, budget, run.params.group_size, run.params.min_tokens
        )
        qtime = time.time() - t0
        pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        layers = pure.pop("layers")

        body = functools.partial(
            _write_baseline,
            run=run,
            config=config,
            budget=budget,
            info=info,
            qtime=qtime,
            pure=pure,
            layers=layers,
            expert_weights=expert_weights,
        )
        report = write_output(run, out_dir, run.overwrite, shared, body)
        reports.append(report)
    return reports


def _write_baseline(
    tmp: Path,
    run: RunConfig,
    config: ModelConfig,
    budget: float,
    info: dict[str, Any],
    qtime: float,
    pure: dict,
    layers: dict,
    expert_weights: int,
) -> WrittenBody:
    """A baseline's output body in `tmp`: its dense params (experts as float32 values of codes ×
    scales, in the converted format), metadata and report (`outputs.write_output` does the rest)."""
    save_tree(tmp / "params" / "top", to_dtype(pure, run.dense_dtype))
    dense_params = 0
    for i in range(config.num_hidden_layers):
        part = layers[i]
        dense = to_dtype(strip_experts(part), run.dense_dtype)
        dense_params += num_params(dense)
        if "mlp" in part and "experts" in part["mlp"]:
            dense.setdefault("mlp", {})["experts"] = to_dtype(part["mlp"]["experts"], "float32")
        save_tree(tmp / "params" / f"layer_{i:03d}", dense)
    top_params = num_params(pure)
    dense = dense_bits(top_params + dense_params, run.dense_dtype)
    bpw = float(info["effective_bpw_experts"])
    summary = {
        "budget_bits": budget,
        "effective_bpw_experts": bpw,
        "effective_bpw_model": (bpw * expert_weights + dense)
        / (expert_weights + top_params + dense_params),
        "expert_weights": expert_weights,
    }
    meta = {
        "format": FORMAT_CONVERTED,
        "version": 1,
        "dtype": "float32",
        "config": json.loads(config.to_json()),
        "quantization": {
            "method": run.method,
            **{k: v for k, v in info.items()},
            **summary,
        },
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    report: dict[str, Any] = {
        "method": run.method,
        "model": str(run.model_path),
        **summary,
        "setting": info["setting"],
        "layers": {},
        "starved_experts": info.get("starved_experts", {}),
        "super_experts": {},
        "allocation_gaps": {},
        "calib_text": str(run.calib_text),
        "num_calib_tokens": int(run.num_calib_tokens),
    }
    # evaluated as written (dense weights at dense_dtype)
    return WrittenBody(report, {"quantize_total": qtime}, lambda: load_model(tmp)[0])
