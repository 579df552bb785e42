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
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.baselines.expertwise import expertwise_quantize
from bitsmoe_jax.baselines.gptq import gptq_quantize_experts
from bitsmoe_jax.baselines.kquants import kquant_experts, type_for_target
from bitsmoe_jax.baselines.rtn import rtn_bpw, rtn_quantize
from bitsmoe_jax.method.expert_source import ArraySource, ExpertSource
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


def local_routing(expert_idx: Any, e0: int, e1: int) -> np.ndarray:
    """The router's choices [N, k] renumbered for the chunk of experts [e0, e1): expert e0 + j is
    j, every other expert is -1 (a per-expert loop over the chunk sees just its routed tokens)."""
    idx = np.asarray(expert_idx)
    return np.where((idx >= e0) & (idx < e1), idx - e0, -1).astype(np.int32)


@dataclasses.dataclass
class BaselineQuantizer:
    """One baseline at one budget, applied to a layer's experts a chunk at a time.

    Every baseline but expert-wise treats each expert on its own (its weights, the tokens routed to
    it), so a layer can be quantized `chunk` experts at a time and the peak memory is a chunk's;
    expert-wise ranks the experts of a layer against each other (`whole_layer`) and so takes the
    layer as one chunk. `info()` is the run's record: setting, effective bpw, starved experts.
    """

    method: str
    target: float
    setting: Setting | None = None  # uniform baselines
    kquant_type: Any = None
    group_size: int = 128  # expert-wise
    budget: float = 0.0  # expert-wise
    min_tokens: int = 16
    starved: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    expert_bits: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    bpws: list[float] = dataclasses.field(default_factory=list)

    @property
    def whole_layer(self) -> bool:
        return self.method == "expertwise"

    @property
    def calibrated(self) -> bool:
        """Needs the layer's calibration inputs and routing (RTN and expert-wise do not)."""
        return self.method.startswith("gptq") or self.method == "kquant"

    def quantize_chunk(
        self,
        layer: int,
        mats: dict[str, np.ndarray],
        e0: int,
        x: jnp.ndarray | None,
        idx: Any,
        w: Any,
        router_kernel: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """float32 {gate, up, down} of experts [e0, e0 + n) quantized (`mats` their weights)."""
        gate, up, down = mats["gate"], mats["up"], mats["down"]
        n = gate.shape[0]
        if self.method.startswith("rtn"):
            s = self.setting
            return {
                p: rtn_quantize(m, s.bits, s.group_size, axis=1, zero_point=s.zero_point)
                for p, m in mats.items()
            }
        if self.method == "expertwise":
            out = expertwise_quantize(gate, up, down, router_kernel, self.budget, self.group_size)
            self.expert_bits[layer] = [int(b) for b in out["bits"]]
            self.bpws.append(float(out["bpw"]))
            return {p: out[p] for p in ("gate", "up", "down")}
        local = local_routing(idx, e0, e0 + n)
        if self.method == "kquant":
            out = kquant_experts(gate, up, down, x, local, w, self.kquant_type, self.min_tokens)
        else:
            s = self.setting
            out = gptq_quantize_experts(
                gate,
                up,
                down,
                x,
                local,
                w,
                s.bits,
                s.group_size,
                min_tokens=self.min_tokens,
                zero_point=s.zero_point,
            )
        self.starved.setdefault(layer, []).extend(e0 + int(e) for e in out["starved"])
        return {p: np.asarray(out[p], np.float32) for p in ("gate", "up", "down")}

    def quantize_layer(
        self,
        layer: int,
        source: ExpertSource,
        chunk: int | None,
        x: jnp.ndarray,
        route: Callable[[jnp.ndarray], tuple[Any, Any, Any]],
        router_kernel: Any,
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(e0, e1, quantized experts [e0, e1)) for the layer, `chunk` experts at a time (all at
        once when None or for a whole-layer method); `x` [N, D] the layer's MoE input, `route` its
        router."""
        idx = w = None
        if self.calibrated:
            _, w, idx = route(x)
        kernel = np.asarray(router_kernel, np.float32) if self.whole_layer else None
        num = source.num_experts
        step = num if (chunk is None or self.whole_layer) else max(1, int(chunk))
        self.starved.setdefault(layer, [])
        for e0 in range(0, num, step):
            e1 = min(e0 + step, num)
            mats = source.read(range(e0, e1))
            yield e0, e1, self.quantize_chunk(layer, mats, e0, x, idx, w, kernel)

    def quantized_layer(self, *args: Any) -> dict[str, np.ndarray]:
        """The layer's quantized experts as whole float32 arrays (what a baseline output stores),
        filled a chunk at a time by `quantize_layer(*args)`."""
        out: dict[str, np.ndarray] = {}
        for e0, e1, mats in self.quantize_layer(*args):
            for p, m in mats.items():
                if p not in out:
                    out[p] = np.empty((args[1].num_experts, *m.shape[1:]), np.float32)
                out[p][e0:e1] = m
        return out

    def info(self) -> dict[str, Any]:
        if self.method == "expertwise":
            g = self.group_size
            return {
                "setting": f"per-expert bits g{g}",
                "effective_bpw_experts": float(np.mean(self.bpws)),
                "expert_bits": self.expert_bits,
            }
        if self.method == "kquant":
            kt = self.kquant_type
            out = {"setting": f"{kt.name} imatrix", "effective_bpw_experts": kt.bpw}
        else:
            out = {"setting": self.setting.label(), "effective_bpw_experts": self.setting.bpw}
        if self.calibrated:
            out["starved_experts"] = {i: sorted(v) for i, v in self.starved.items()}
        return out


def baseline_quantizer(
    method: str, config: Any, target: float, group_size: int, min_tokens: int
) -> BaselineQuantizer:
    """The quantizer of `method` at `target` bpw for a model of `config`: uniform baselines take the
    (bits, group) setting nearest the target; K-quants the type with at least the target;
    expert-wise the target as its budget."""
    contraction = min(config.hidden_size, config.moe_intermediate_size)
    if method in UNIFORM_BASELINES:
        setting = nearest_setting(
            uniform_settings(contraction, zero_point=method.endswith("_asym")), target
        )
        return BaselineQuantizer(method, target, setting=setting, min_tokens=min_tokens)
    if method == "kquant":
        return BaselineQuantizer(
            method, target, kquant_type=type_for_target(target), min_tokens=min_tokens
        )
    if method == "expertwise":
        # if even 2 bits + its scales exceed the target at `group_size`, the largest group that fits
        # a row is used, and if that is still too much every expert gets 2 bits (the report then
        # shows the effective bpw above the target)
        g = group_size if 2 + 16.0 / group_size <= target else contraction
        return BaselineQuantizer(
            method, target, group_size=g, budget=max(target, 2 + 16.0 / g), min_tokens=min_tokens
        )
    raise ValueError(
        f"unknown baseline {method!r}; choose {', '.join(UNIFORM_BASELINES)}, expertwise or kquant"
    )


def run_baseline(
    method: str, model, calib: jnp.ndarray, target: float, group_size: int, min_tokens: int
) -> dict:
    """Quantize `model`'s routed experts in place with a baseline at `target` bpw (the whole model
    in memory: `compare` on small models; the quantize command streams, `run.baseline_driver`);
    returns its info."""
    quantizer = baseline_quantizer(method, model.config, target, group_size, min_tokens)

    def q(i, block, x):
        ex = block.experts
        source = ArraySource(*(np.asarray(v[...]) for v in (ex.gate, ex.up, ex.down)))
        out = quantizer.quantized_layer(i, source, None, x, block.router, block.router.kernel[...])
        _set_experts(block, out["gate"], out["up"], out["down"])

    sequential_quantize(model, calib, q)
    return quantizer.info()
