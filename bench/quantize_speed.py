"""Quantization time of one MoE layer: BitsMoE's stages against GPTQ, side by side, same machine.

    python bench/quantize_speed.py [--shapes 256x256x16 512x1024x8 1024x2048x8] [--tokens 4096]
    [--bits 2.0]

For each shape DxFxE a synthetic layer (random experts with a decaying spectrum, random routing
of `tokens` calibration tokens, top-2) is quantized by BitsMoE (bases, statistics, loss coefficients
in exact and sampled mode, allocation, rounding with GPTQ-style error feedback (the default) or
nearest, packing) and by GPTQ (per-expert Hessians, then GPTQ on gate, up and down at 2-bit g128).
Each timing is taken after a warm-up run of the same shape, so compilation
is excluded. Prints seconds per stage and the ratio GPTQ / BitsMoE.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.baselines.gptq import gptq_quantize_experts
from bitsmoe_jax.method.calibrate import collect_expert_stats
from bitsmoe_jax.method.coefficients import (
    PROJECTIONS,
    layer_units,
    loss_coefficients,
    loss_weights,
)
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.error_feedback import CalibrationInputs
from bitsmoe_jax.method.layer_problem import LayerProblem, allocate_layers, make_bases
from bitsmoe_jax.serve.quantized_experts import pack_layer


def synthetic_layer(d: int, f: int, e: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    decay = (1.0 / np.sqrt(1 + np.arange(d)))[:, None].astype(np.float32)
    gate = rng.normal(size=(e, d, f)).astype(np.float32) * decay / np.sqrt(d)
    up = rng.normal(size=(e, d, f)).astype(np.float32) * decay / np.sqrt(d)
    down = rng.normal(size=(e, f, d)).astype(np.float32) / np.sqrt(f)
    x = rng.normal(size=(n, d)).astype(np.float32)
    logits = rng.normal(size=(n, e)).astype(np.float32)
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    w, idx = jax.lax.top_k(probs, 2)
    return (
        gate,
        up,
        down,
        jnp.asarray(x),
        jnp.asarray(logits),
        idx.astype(jnp.int32),
        w / w.sum(-1, keepdims=True),
    )


def bitsmoe_layer(
    gate, up, down, x, logits, idx, w, budget: float, mode: str, rounding: str = "gptq"
) -> dict[str, float]:
    cfg = MethodConfig()
    t = {}
    s = time.perf_counter()
    stored, deq = make_bases(gate, up, down, None, 8)
    units = layer_units(gate, up, down, deq)
    t["basis"] = time.perf_counter() - s
    s = time.perf_counter()
    stats = collect_expert_stats(
        x,
        logits,
        idx,
        w,
        jnp.asarray(gate),
        jnp.asarray(up),
        jnp.asarray(deq["gate"]),
        jnp.asarray(deq["up"]),
        16,
    )
    t["statistics"] = time.perf_counter() - s
    s = time.perf_counter()
    weights = loss_weights(stats, down, {p: units[p].shape[1] for p in PROJECTIONS}, 0.25)
    coeffs = loss_coefficients(units, weights, cfg.candidate_bits, cfg.group_size, mode)
    t["coefficients"] = time.perf_counter() - s
    calib = (
        CalibrationInputs(np.asarray(x), np.asarray(idx), np.asarray(w))
        if rounding == "gptq"
        else None
    )
    problem = LayerProblem(
        0,
        gate.shape[0],
        gate.shape[1],
        gate.shape[2],
        units,
        weights,
        coeffs,
        stored,
        8,
        stats,
        [],
        8,
        cfg.group_size,
        calib,
    )
    s = time.perf_counter()
    bits, _ = allocate_layers([problem], budget, "layer", {"allocator": "greedy"})[0]
    t["allocation"] = time.perf_counter() - s
    s = time.perf_counter()
    pack_layer(problem, bits)
    t["pack"] = time.perf_counter() - s
    t["total"] = sum(t.values())
    return t


def gptq_layer(gate, up, down, x, idx, w) -> float:
    s = time.perf_counter()
    out = gptq_quantize_experts(gate, up, down, x, idx, w, bits=2, group_size=128)
    jax.block_until_ready(out["gate"])
    return time.perf_counter() - s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["256x256x16", "512x1024x8", "1024x2048x8"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--bits", type=float, default=2.0)
    args = p.parse_args()
    print(
        f"JAX {jax.__version__} on {jax.default_backend()}, {args.tokens} calibration tokens, "
        f"budget {args.bits} bpw"
    )
    print(
        "| D x F x E | BitsMoE default (s) | exact, nearest (s) | sampled, nearest (s) | GPTQ "
        "2-bit g128 (s) "
        "| GPTQ / default | GPTQ / exact-nearest | GPTQ / sampled-nearest |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        d, f, e = (int(v) for v in shape.split("x"))
        layer = synthetic_layer(d, f, e, args.tokens)
        gate, up, down, x, logits, idx, w = layer
        variants = {
            "default": ("exact", "gptq"),
            "exact": ("exact", "nearest"),
            "sampled": ("sampled", "nearest"),
        }
        for (
            mode,
            rounding,
        ) in variants.values():  # warm-up: compile every jitted stage for this shape
            bitsmoe_layer(*layer, args.bits, mode, rounding)
        gptq_layer(gate, up, down, x, idx, w)
        t = {k: bitsmoe_layer(*layer, args.bits, m, r) for k, (m, r) in variants.items()}
        g = gptq_layer(gate, up, down, x, idx, w)
        tot = {k: v["total"] for k, v in t.items()}
        print(
            f"| {shape} | {tot['default']:.2f} | {tot['exact']:.2f} | {tot['sampled']:.2f} | "
            f"{g:.2f} | "
            f"{g / tot['default']:.2f} | {g / tot['exact']:.2f} | {g / tot['sampled']:.2f} |",
            flush=True,
        )
        print(
            "  stages (default): " + ", ".join(f"{k} {v:.2f}s" for k, v in t["default"].items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
