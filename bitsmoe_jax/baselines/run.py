"""Baselines run the way BitsMoE runs: layer by layer on the same calibration, at a matched budget.

Uniform baselines (RTN, GPTQ) pick the (bits, group size) setting whose effective bits per weight (b
+ 16/group for a bf16 scale per group; b + (16 + b)/group with a b-bit zero point as well) is
nearest to the target; expert-wise mixed precision takes the target as its budget. `rtn` and `gptq`
use the symmetric grid; `rtn_asym` and `gptq_asym` the zero-point grid (GPTQ's reference default),
which uses all 2^b levels and is the stronger baseline at 2 bits. Calibration is sequential: the
inputs of layer i come from layers 0..i−1 already quantized, routing from the layer's own router.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.baselines.expertwise import expertwise_quantize
from bitsmoe_jax.baselines.gptq import gptq_quantize_experts
from bitsmoe_jax.baselines.kquants import kquant_experts, type_for_target
from bitsmoe_jax.baselines.rtn import rtn_bpw, rtn_quantize
from bitsmoe_jax.models.moe import Experts
from bitsmoe_jax.models.transformer import attention_part

BASELINE_BITS = (2, 3, 4, 5, 6, 8)
BASELINE_GROUPS = (16, 32, 64, 128, 256)
UNIFORM_BASELINES = ("rtn", "rtn_asym", "gptq", "gptq_asym")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One uniform-bits setting of a baseline: `bits` per weight plus a bf16 scale (and, with
    `zero_point`, a b-bit zero) per group."""

    bits: int
    group_size: int
    bpw: float
    zero_point: bool = False

    def label(self) -> str:
        return f"{self.bits}-bit g{self.group_size}" + (" zero-point" if self.zero_point else "")


def uniform_settings(contraction: int, zero_point: bool = False) -> list[Setting]:
    """All (bits, group) settings; a group never spans more than one row of `contraction` inputs."""

    out = []
    for b in BASELINE_BITS:
        for g in BASELINE_GROUPS:
            g_eff = min(g, contraction)
            out.append(Setting(b, g_eff, rtn_bpw(b, g_eff, zero_point), zero_point))
    return sorted(set(out), key=lambda s: (s.bpw, -s.bits))


def nearest_setting(settings: list[Setting], target: float) -> Setting:
    """Closest bpw to the target; ties go to more bits per weight (fewer scales)."""
    return min(settings, key=lambda s: (abs(s.bpw - target), -s.bits))


def sequential_quantize(
    model, calib: jnp.ndarray, quantize_layer: Callable[[int, Any, jnp.ndarray], None]
) -> None:
    """Run calibration layer by layer, letting `quantize_layer(i, moe_block, moe_input[N, D])`
    replace
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

    def q(i, block, x):
        ex = block.experts
        _set_experts(
            block,
            *(
                rtn_quantize(
                    np.asarray(w[...]),
                    setting.bits,
                    setting.group_size,
                    axis=1,
                    zero_point=setting.zero_point,
                )
                for w in (ex.gate, ex.up, ex.down)
            ),
        )

    sequential_quantize(model, calib, q)
    return {"setting": setting.label(), "effective_bpw_experts": setting.bpw}


def run_gptq(model, calib, setting: Setting, min_tokens: int) -> dict:

    starved: dict[int, list[int]] = {}

    def q(i, block, x):
        _, w, idx = block.router(x)
        ex = block.experts
        out = gptq_quantize_experts(
            np.asarray(ex.gate[...]),
            np.asarray(ex.up[...]),
            np.asarray(ex.down[...]),
            x,
            idx,
            w,
            setting.bits,
            setting.group_size,
            min_tokens=min_tokens,
            zero_point=setting.zero_point,
        )
        starved[i] = list(out["starved"])
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return {
        "setting": setting.label(),
        "effective_bpw_experts": setting.bpw,
        "starved_experts": starved,
    }


def run_kquant(model, calib, target: float, min_tokens: int) -> dict:
    """llama.cpp's K-quant format with at least `target` bpw (Q2_K at 2.0 and 2.5, Q3_K at 3.0, …),
    fitted with importance from the calibration tokens routed to each expert."""

    kt = type_for_target(target)
    starved: dict[int, list[int]] = {}

    def q(i, block, x):
        _, w, idx = block.router(x)
        ex = block.experts
        out = kquant_experts(
            ex.gate[...], ex.up[...], ex.down[...], x, idx, w, kt, min_tokens=min_tokens
        )
        starved[i] = list(out["starved"])
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return {
        "setting": f"{kt.name} imatrix",
        "effective_bpw_experts": kt.bpw,
        "starved_experts": starved,
    }


def run_expertwise(model, calib, target: float, group_size: int) -> dict:
    """Expert-wise bits at the target; if even 2 bits + its scales exceed it at `group_size`, the
    largest group that fits a row is used, and if that is still too much every expert gets 2 bits
    (the report then shows the effective bpw above the target)."""

    config = model.config
    row = min(config.hidden_size, config.moe_intermediate_size)
    g = group_size if 2 + 16.0 / group_size <= target else row
    budget = max(target, 2 + 16.0 / g)
    bits, bpws = {}, []

    def q(i, block, x):
        ex = block.experts
        out = expertwise_quantize(
            np.asarray(ex.gate[...]),
            np.asarray(ex.up[...]),
            np.asarray(ex.down[...]),
            np.asarray(block.router.kernel[...]),
            budget,
            group_size=g,
        )
        bits[i] = [int(b) for b in out["bits"]]
        bpws.append(float(out["bpw"]))
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return {
        "setting": f"per-expert bits g{g}",
        "effective_bpw_experts": float(np.mean(bpws)),
        "expert_bits": bits,
    }


def run_baseline(
    method: str, model, calib: jnp.ndarray, target: float, group_size: int, min_tokens: int
) -> dict:
    """Quantize `model`'s routed experts in place with a baseline at `target` bpw; returns its
    info."""
    config = model.config
    contraction = min(config.hidden_size, config.moe_intermediate_size)
    if method in UNIFORM_BASELINES:
        setting = nearest_setting(
            uniform_settings(contraction, zero_point=method.endswith("_asym")), target
        )
        if method.startswith("rtn"):
            return run_rtn(model, calib, setting)
        return run_gptq(model, calib, setting, min_tokens)
    if method == "expertwise":
        return run_expertwise(model, calib, target, group_size)
    if method == "kquant":
        return run_kquant(model, calib, target, min_tokens)
    raise ValueError(
        f"unknown baseline {method!r}; choose {', '.join(UNIFORM_BASELINES)}, expertwise or kquant"
    )
