"""Kernels to compile for a whole model, with and without shared layout shapes (runs on CPU).

    python bench/shared_kernels.py                         # Mixtral-8x7B, 32 layers, GPU kernels
    python bench/shared_kernels.py --compile               # + time the Triton compiles (pip triton)
    python bench/shared_kernels.py --backend mosaic_tpu --layers 8
    python bench/shared_kernels.py --layers 4 --xla-compile  # on a GPU: XLA's compile of the
    forward, timed

Every MoE layer's bit allocation gives its kernel layout other static shapes, so without sharing
each layer compiles its own kernels (`pallas_kernels.shared_shapes`). This script builds the
layouts of ``--layers`` layers at a full layer shape (synthetic allocations: one random allocation
per layer; "one budget" gives every layer ``--bpw``, "budgets by layer" spreads them evenly over
``--spread``, as a model-wide allocation would), plans shared shapes at several padding bounds,
lowers the one-token forward of all layers for the target (``jax.export``, nothing runs), and counts
the distinct kernel configs in the module: XLA compiles one kernel per distinct config. It prints,
side by side in one run: shape groups, the device memory padding costs, kernels to compile, the
lowering seconds (tracing the kernels; Python, this CPU) and, with ``--compile``, the seconds pip
Triton takes to compile them for sm_90 on this CPU (XLA's own Triton differs in detail). On a GPU,
``--xla-compile`` also compiles each row's forward with XLA (``jit(...).lower(...).compile()``,
caches cleared) and prints the seconds: the cold start a user waits for.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from kernels import (
    FULL_SHAPES,
    synthetic_kernels,
)  # bench/kernels.py: the same shapes and allocations
from triton_sass import triton_compile, triton_ir_capture  # bench/triton_sass.py

from pallas_kernels import shared_shapes
from pallas_kernels.api import DEFAULT_TILES, ExpertKernels, swiglu_experts
from pallas_kernels.lowered import PLATFORMS, export_for_hardware, kernel_configs

SHAPES = {s.name: s for s in FULL_SHAPES}


def layer_layouts(shape, backend: str, bpws: list[float]) -> list[ExpertKernels]:
    """Abstract kernel layouts of one layer per entry of ``bpws`` (seeded by the layer index)."""
    tiles = DEFAULT_TILES[backend]
    out = []
    for i, bpw in enumerate(bpws):
        _, kern = synthetic_kernels(shape, bpw, tiles, seed=10 * i, abstract=True)
        out.append(shared_shapes.abstract(kern))
    return out


def lower_layers(
    shape, backend: str, layers: list[ExpertKernels], tokens: int, xla_compile: bool = False
) -> tuple[list[str], list[str], float, float | None]:
    """Export the one-token forward of every layer -> (kernel configs, captured Triton IR, seconds,
    and with ``xla_compile`` the seconds XLA takes to compile it on this machine's GPU)."""

    def forward(z, sizes, kerns):
        return [swiglu_experts(z, z, sizes, k, backend=backend, interpret=False) for k in kerns]

    z = jax.ShapeDtypeStruct((tokens * shape.top_k, shape.hidden), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((shape.experts,), jnp.int32)
    jax.clear_caches()  # each row traces from scratch, as a fresh process would
    t0 = time.perf_counter()
    with triton_ir_capture() as captured:
        exported = export_for_hardware(jax.jit(forward), backend, z, sizes, layers)
    lower_s = time.perf_counter() - t0
    compile_s = None
    if xla_compile:
        jax.clear_caches()
        t0 = time.perf_counter()
        jax.jit(forward).lower(z, sizes, layers).compile()
        compile_s = time.perf_counter() - t0
    return kernel_configs(exported.mlir_module(), backend), captured, lower_s, compile_s


@functools.cache
def compile_seconds(ttir: str) -> float:
    """Seconds pip Triton takes to compile one kernel's IR for sm_90 (this CPU), cold: its on-disk
    cache (``~/.triton/cache``) would return a kernel compiled by an earlier run in milliseconds."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        try:
            t0 = time.perf_counter()
            triton_compile(ttir, 4, 2, tmp)
            return time.perf_counter() - t0
        finally:
            if saved is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def compile_estimate(modules: list[str], max_compiles: int) -> str:
    """Total compile seconds of the distinct modules: each of the first ``max_compiles`` measured,
    the rest estimated from the mean of their kind (gate/up or down)."""
    distinct = list(dict.fromkeys(modules))

    def kind(ttir):
        return "gate_up" if "gate_up" in ttir else "down"

    measured = {i: compile_seconds(m) for i, m in enumerate(distinct[:max_compiles])}
    means = {
        k: np.mean([s for i, s in measured.items() if kind(distinct[i]) == k] or [np.nan])
        for k in ("gate_up", "down")
    }
    total = sum(measured.values()) + sum(means[kind(m)] for m in distinct[max_compiles:])
    note = (
        ""
        if len(distinct) <= max_compiles
        else f" ({len(measured)} measured, {len(distinct) - len(measured)} estimated)"
    )
    return f"{total:.0f}{note}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="Mixtral-8x7B", choices=list(SHAPES))
    ap.add_argument("--backend", default="triton", choices=list(PLATFORMS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--bpw", type=float, default=2.5)
    ap.add_argument(
        "--spread", default="2.0,3.0", help="lowest,highest bpw of the budgets-by-layer allocation"
    )
    ap.add_argument("--paddings", default="0,0.02,0.05,inf", help="max_padding bounds to plan with")
    ap.add_argument(
        "--compile", action="store_true", help="time the Triton compiles (needs pip triton)"
    )
    ap.add_argument(
        "--max-compiles",
        type=int,
        default=4,
        help="kernels compiled per row; the rest are estimated",
    )
    ap.add_argument(
        "--xla-compile",
        action="store_true",
        help="on a GPU/TPU: time XLA's compile of each row's forward",
    )
    args = ap.parse_args(argv)
    if args.compile and args.backend != "triton":
        ap.error("--compile times Triton kernels: use it with --backend triton")
    if (
        args.xla_compile
        and jax.default_backend() != {"triton": "gpu", "mosaic_tpu": "tpu"}[args.backend]
    ):
        ap.error(
            "--xla-compile compiles for the device: this machine's JAX backend is "
            f"{jax.default_backend()!r}"
        )
    shape = SHAPES[args.shape]
    lo, hi = (float(x) for x in args.spread.split(","))
    allocations = {
        f"one budget ({args.bpw} bpw)": [args.bpw] * args.layers,
        f"budgets by layer ({lo}–{hi} bpw)": list(np.linspace(lo, hi, args.layers)),
    }
    bounds = [float(x) for x in args.paddings.split(",")]
    print(
        f"{args.shape}, {args.layers} layers, {args.backend} kernels, {args.tokens} token(s): "
        f"layout shapes planned with `shared_shapes.plan_groups`, forward lowered with jax.export\n"
    )
    extra = [
        c
        for c, on in ((" Triton compile s |", args.compile), (" XLA compile s |", args.xla_compile))
        if on
    ]
    print(
        "| allocation | max_padding | shape groups | padding (device memory) | kernels to compile "
        "| lowering s |" + "".join(extra)
    )
    print("|---|---|---|---|---|---|" + "---|" * len(extra))
    for name, bpws in allocations.items():
        layers = layer_layouts(shape, args.backend, bpws)
        rows = [("unshared", layers, None)]
        for bound in bounds:
            plan = shared_shapes.plan_groups([k.parts() for k in layers], bound)
            rows.append((bound, [ExpertKernels(*plan.targets[g]) for g in plan.group_of], plan))
        for bound, lay, plan in rows:
            configs, modules, secs, xla_s = lower_layers(
                shape, args.backend, lay, args.tokens, args.xla_compile
            )
            groups = plan.num_groups if plan else len({tuple(jax.tree.leaves(k)) for k in lay})
            pad = (
                f"+{100 * plan.padding:.2f} % "
                f"({(plan.bytes_padded - plan.bytes_unpadded) / 2**20:.0f} MiB)"
                if plan
                else "0"
            )
            label = (
                bound if isinstance(bound, str) else ("∞" if math.isinf(bound) else f"{bound:g}")
            )
            line = f"| {name} | {label} | {groups} | {pad} | {len(set(configs))} | {secs:.1f} |"
            if args.compile:
                line += f" {compile_estimate(modules, args.max_compiles)} |"
            if args.xla_compile:
                line += f" {xla_s:.1f} |"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
