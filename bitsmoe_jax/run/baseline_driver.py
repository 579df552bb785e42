"""The baselines' run: RTN / GPTQ / expert-wise / K-quants at each budget, calibrated like BitsMoE,
written with the same report."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from bitsmoe_jax.baselines.kquants import check_contractions
from bitsmoe_jax.baselines.run import BaselineQuantizer, baseline_quantizer
from bitsmoe_jax.io.checkpoint import FORMAT_CONVERTED, META_FILE, save_tree
from bitsmoe_jax.loading import checkpoint_kind, iter_model_parts, load_model, model_config
from bitsmoe_jax.method.expert_source import ArraySource, plan_chunk
from bitsmoe_jax.method.streamed import StreamedExperts
from bitsmoe_jax.models.assemble import build_layer
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock
from bitsmoe_jax.models.transformer import attention_part
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.budgets import budget_dirs, release_layer_executables
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.expert_reader import layer_source
from bitsmoe_jax.run.inputs import calibration_tokens
from bitsmoe_jax.run.outputs import (
    WrittenBody,
    num_params,
    stored_bits,
    strip_experts,
    to_dtype,
    write_output,
)
from bitsmoe_jax.run.preflight import check_checkpoint
from bitsmoe_jax.run.progress import LayerProgress
from conversion.hf_checkpoint import HFCheckpoint


def quantize_baseline(run: RunConfig, progress: bool = True) -> list[dict[str, Any]]:
    """RTN / GPTQ / expert-wise / K-quants at each budget, calibrated like BitsMoE, written with the
    same report.

    The checkpoint keeps the dequantized expert weights (float32, exact values of codes × scales) in
    the converted format, so `load_model` and `evaluate` read it directly; its effective bpw counts
    what the method stores (integer codes and their scales: bf16 per group, or the K-quants' integer
    sub-block scales and fp16 factors), not the float32 container.

    Streamed like BitsMoE: the checkpoint is read a layer at a time and (Hugging Face directories)
    a layer's experts a chunk at a time from their bytes; each chunk is quantized and dropped, the
    next layer's inputs come from the quantized layer, and each layer is written as soon as it is
    done. The one whole-layer float32 array is the layer's quantized experts, which the output
    stores.
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
    check_checkpoint(run, config, progress)
    calib = jnp.asarray(
        calibration_tokens(
            run.model_path, run.calib_text, run.num_calib_tokens, run.seq_len, run.tokenizer
        )
    )
    plan = plan_chunk(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        run.num_calib_tokens,
        run.host_memory_gb,
        run.expert_chunk,
        host_processes=distributed.processes_on_this_host(),
    )
    if progress:
        distributed.log(plan.describe(config.num_experts))
    reports = []
    shared: dict = {}
    for budget, out_dir in budgets:
        quantizer = baseline_quantizer(
            run.method, config, budget, run.params.group_size, run.params.min_tokens
        )
        body = functools.partial(
            _write_baseline,
            run=run,
            config=config,
            budget=budget,
            quantizer=quantizer,
            calib=calib,
            chunk=plan.chunk,
            progress=progress,
        )
        log = distributed.log if progress else None
        reports.append(write_output(run, out_dir, run.overwrite, shared, body, log))
    return reports


def _write_baseline(
    tmp: Path,
    run: RunConfig,
    config: ModelConfig,
    budget: float,
    quantizer: BaselineQuantizer,
    calib: jnp.ndarray,
    chunk: int,
    progress: bool,
) -> WrittenBody:
    """A baseline's output body in `tmp`, quantized and written a layer at a time: its dense params
    (experts as float32 values of codes × scales, in the converted format), metadata and report
    (`outputs.write_output` does the rest)."""
    t0 = time.time()
    write_s = 0.0
    streamed = checkpoint_kind(run.model_path) == "hf"
    ckpt = HFCheckpoint(run.model_path) if streamed else None
    bar = LayerProgress(config.num_hidden_layers, enabled=progress)
    top_params = dense_params = expert_weights = dense_stored = 0
    x = None
    try:
        for name, part in iter_model_parts(run.model_path, experts=() if streamed else None):
            if name == "top":
                x = jnp.take(jnp.asarray(part["embed_tokens"]["embedding"]), calib, axis=0)
                top_params = num_params(part)
                t = time.time()
                top = to_dtype(part, run.dense_dtype)
                dense_stored += stored_bits(top)
                save_tree(tmp / "params" / "top", top)
                write_s += time.time() - t
                continue
            i = int(name)
            t_layer = time.time()
            source = layer_source(run.model_path, i, config, ckpt, part)
            layer = build_layer(config, i, part)
            dense = to_dtype(strip_experts(part), run.dense_dtype)
            dense_params += num_params(dense)
            dense_stored += stored_bits(dense)
            del part
            resid, moe_in = attention_part(layer, x, config)
            if source is not None:
                block: MoEBlock = layer.mlp
                d, f, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
                out = quantizer.quantized_layer(
                    i, source, chunk, moe_in.reshape(-1, d), block.router, block.router.kernel[...]
                )
                expert_weights += 3 * e * d * f
                block.experts = StreamedExperts(
                    ArraySource(out["gate"], out["up"], out["down"]), chunk
                )
                dense.setdefault("mlp", {})["experts"] = out
                x = resid + block(moe_in)
            else:
                x = resid + layer.mlp(moe_in)
            t = time.time()
            save_tree(tmp / "params" / f"layer_{i:03d}", dense)
            write_s += time.time() - t
            bar.layer_done(i, time.time() - t_layer, {})
            layer = block = dense = out = source = resid = moe_in = None
            release_layer_executables()
    finally:
        bar.close()  # an error's message then starts on a line of its own
    qtime = time.time() - t0 - write_s
    info = quantizer.info()
    dense = dense_stored
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
    return WrittenBody(
        report, {"quantize_total": qtime, "write": write_s}, lambda: load_model(tmp)[0]
    )
