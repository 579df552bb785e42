"""Benchmark: the Pallas quantized expert kernels against bf16 ``ragged_dot`` and the XLA dequantize
path.

    python bench/kernels.py --quick --out results/kernels_gpu.md   # GPU/TPU: the bar first, ~6 min
    python bench/kernels.py                 # on a GPU/TPU: every shape × budget × token count
    python bench/kernels.py --smoke         # CPU, interpret mode, tiny shapes: checks it runs end
    to end

Each configuration compiles its own kernels (the layout's widths and tile counts are static): about
half a minute per configuration on GPU, mostly the gate/up kernel. ``--quick`` runs the issue's bar
(Mixtral-8x7B, 2.5 bpw, 1 token) first, then a few more; ``--budget-s`` stops starting new ones;
``--cache DIR`` keeps compiled kernels for a rerun on the same machine; ``--out`` rewrites a
markdown file after every row, so a run cut short still leaves its table.

First a correctness check of the compiled kernels against the pure-jnp reference on a real packed
layer (exit status 1 if it fails). What is measured, all in the same process, each function jitted,
compiled once, then timed as the mean of ``--iters`` back-to-back calls (after a warm-up call):

* **copy bandwidth** of the device: ``y = x * 1.0001`` over a large float32 array (reads and writes
  every byte; XLA cannot elide it), bytes moved / time.
* per layer shape (Mixtral-8x7B: D=4096, F=14336, E=8, top-2; Qwen3-30B-A3B: D=2048, F=768, E=128,
  top-8), full rank r = D, per budget (2.0 / 2.5 / 3.0 bits per weight) and per token count
  (decode 1, 2, 4, 8; prefill 512), with random top-k routing and bf16 activations:
  - ``pallas``: `pallas_kernels.api.swiglu_experts` (the routed experts: gate/up fused with SiLU,
    down);
  - ``xla``: the XLA path of `QuantizedExperts` — `dequantize_packed` of every expert, then
    `grouped_matmul` (``ragged_dot`` on GPU/TPU);
  - ``bf16``: ``jax.lax.ragged_dot`` SwiGLU on dense bf16 experts (the unquantized model's experts);
  - ``layer q`` / ``layer bf16``: the whole routed-expert layer including the shared 8-bit bases
    (``x·Ṽ`` before, ``acc·Ũᵀ`` after; per-row scale folded into ``x`` / the output) vs bf16.
  Achieved bandwidth = packed bytes of the *routed* experts (their plane words + scales, read once)
  / pallas time; ``%copy`` relates it to the measured copy bandwidth.
* **layout overhead**: bytes of the kernel layout (all experts) vs the stored format's bits
  (`PackedMatrix.stored_bits`): boundary-tile promotion, tail padding, bf16 scales of dead rows.
* **end to end**: greedy decode tokens/s of the shipped reference model (bf16) vs the same model
  with its experts quantized at ~2.5 bits (random widths, `quantized_from_dense`), on the platform's
  kernel backend.

The allocations are synthetic: per projection, random widths from {0,1,2,3,4,8} with integer-bit
mean ``bpw − 16/group_size`` (bf16 group scales add ``16/group_size`` bits per weight), the words
random (any word is a valid code). Bytes read and work per tile are those of a real checkpoint with
such an allocation; the values are noise. Prints a markdown table with the device name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bitsmoe_jax.inference import greedy_generate
from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.method.packing import PackedMatrix, dequantize_packed, num_words, pack_segments
from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.serve.quantized_experts import set_backend
from bitsmoe_jax.serve.synthetic_experts import quantized_from_dense
from pallas_kernels.api import (
    DEFAULT_TILES,
    ExpertKernels,
    build_expert_kernels,
    kernel_backend_for,
    swiglu_experts,
)
from pallas_kernels.mosaic_tpu.layout import synthetic_plane_tiles
from pallas_kernels.reference import swiglu_experts_reference
from pallas_kernels.tiles import random_allocation
from pallas_kernels.triton.layout import CodeConfig, synthetic_code_tiles

GROUP = 128


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    hidden: int
    inter: int
    top_k: int


FULL_SHAPES = (Shape("Mixtral-8x7B", 8, 4096, 14336, 2), Shape("Qwen3-30B-A3B", 128, 2048, 768, 8))
SMOKE_SHAPES = (Shape("tiny-mixtral", 4, 128, 256, 2), Shape("tiny-qwen3", 16, 64, 128, 4))


# ------------------------------------------------------------------------------------------ timing
def time_fn(fn: Callable[..., Any], *args: Any, iters: int) -> float:
    """Mean seconds per call over ``iters`` back-to-back calls, after one compiling warm-up call."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """Device copy bandwidth in bytes/s: ``x * 1.0001`` reads and writes ``nbytes`` each."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = time_fn(jax.jit(lambda a: a * 1.0001), x, iters=iters)
    return 2 * nbytes / t


# ------------------------------------------------------------------------------------------ inputs
def synthetic_packed(bits: np.ndarray, n: int, rng: np.random.Generator) -> PackedMatrix:
    """A stored-format PackedMatrix with the given widths ``[E, r]`` and random words / scales."""
    flat = bits.reshape(-1)
    perm = np.argsort(flat, kind="stable")
    seg_bits, seg_sizes = np.unique(flat[perm], return_counts=True)
    ng = -(-n // GROUP)
    payload, scales = [], []
    for b, size in zip(seg_bits.tolist(), seg_sizes.tolist(), strict=False):
        if b == 0:
            payload.append(np.zeros((size, 0), np.uint32))
            scales.append(np.zeros((size, 0), ml_dtypes.bfloat16))
        else:
            payload.append(rng.integers(0, 2**32, size=(size, num_words(n, b)), dtype=np.uint32))
            scales.append(
                (rng.uniform(0.5, 1.5, size=(size, ng)) * 1e-2).astype(ml_dtypes.bfloat16)
            )
    return PackedMatrix(
        perm.astype(np.int32),
        tuple(payload),
        tuple(scales),
        n,
        GROUP,
        tuple(int(b) for b in seg_bits),
        tuple(int(s) for s in seg_sizes),
    )


def routing(tokens: int, shape: Shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random distinct top-k experts per token -> (token of each sorted row, group sizes)."""
    idx = np.stack(
        [rng.choice(shape.experts, size=shape.top_k, replace=False) for _ in range(tokens)]
    )
    order = np.argsort(idx.reshape(-1), kind="stable")
    sizes = np.bincount(idx.reshape(-1), minlength=shape.experts).astype(np.int32)
    return (order // shape.top_k).astype(np.int32), sizes


def routed_bytes(kern: ExpertKernels, sizes: np.ndarray) -> int:
    """Packed bytes (words + scales, kernel layout) of the experts that received rows, each read
    once."""
    return sum(pt.expert_bytes(int(e)) for pt in kern.parts() for e in np.flatnonzero(sizes))


def synthetic_kernels(shape: Shape, bpw: float, tiles, seed: int = 0, abstract: bool = False):
    """Random allocations (integer-bit mean ``bpw − 16/GROUP``) and their kernel layouts (the family
    follows the type of ``tiles``: `CodeConfig` GPU, `TileConfig` TPU)."""
    e, d, f = shape.experts, shape.hidden, shape.inter
    allocs = {
        p: random_allocation(e, d, bpw - 16 / GROUP, seed=seed + i)
        for i, p in enumerate(("gate", "up", "down"))
    }
    if isinstance(tiles, CodeConfig):
        parts = (
            synthetic_code_tiles(allocs[p], f, GROUP, tiles.tile, seed=seed + i, abstract=abstract)
            for i, p in enumerate(("gate", "up", "down"))
        )
    else:
        parts = (
            synthetic_plane_tiles(allocs[p], f, o, tiles, GROUP, seed=seed + i, abstract=abstract)
            for i, (p, o) in enumerate((("gate", "rows"), ("up", "rows"), ("down", "lanes")))
        )
    return allocs, ExpertKernels(*parts)


def layout_overhead(
    shape: Shape, bpw: float, allocs: dict[str, np.ndarray], kern: ExpertKernels
) -> tuple:
    """(name, bpw, stored bits per weight, kernel-layout bytes, stored bytes) — stored = what
    `PackedMatrix.stored_bits` counts (words + bf16 group scales; the permutation is left out, the
    kernel layout has its own index tables)."""
    f = shape.inter
    ng = -(-f // GROUP)
    stored_bits = sum(int(a.sum()) * f + int((a > 0).sum()) * ng * 16 for a in allocs.values())
    eff = stored_bits / (3 * shape.experts * shape.hidden * f)
    return shape.name, bpw, eff, kern.bytes_read(), stored_bits / 8


def print_overhead(overhead: list[tuple]) -> None:
    print("\nlayout overhead (all experts, 3 projections):\n")
    print(
        "| shape | bpw | stored bits/weight | stored MB | kernel layout MB | overhead "
        "|\n|---|---|---|---|---|---|"
    )
    for name, bpw, eff, kbytes, sbytes in overhead:
        print(
            f"| {name} | {bpw:.1f} | {eff:.3f} | {sbytes / 1e6:.1f} | {kbytes / 1e6:.1f} | "
            f"{100 * (kbytes / sbytes - 1):+.1f}% |"
        )


# ------------------------------------------------------------------------------------------ paths
def bf16_experts(x, token, sizes, gate, up, down):
    xs = x[token]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    return jax.lax.ragged_dot(h, down, sizes, preferred_element_type=jnp.float32)


def xla_experts(zg, zu, sizes, packed: dict[str, PackedMatrix], num_experts: int):
    ag, au, bd = (
        dequantize_packed(packed[p]).reshape(num_experts, -1, packed[p].n).astype(zg.dtype)
        for p in ("gate", "up", "down")
    )
    h = jax.nn.silu(grouped_matmul(zg, ag, sizes)) * grouped_matmul(zu, au, sizes)
    return grouped_matmul(h, jnp.swapaxes(bd, 1, 2), sizes).astype(jnp.float32)


def quantized_layer(x, token, sizes, bases, kern, backend, interpret, tm=None, splits=None):
    """Bases (int8 codes ``q [D, r]`` + bf16 row scales ``s [D]``) around the kernels: the row scale
    folds into ``x`` before ``x·Q`` and into the output after ``acc·Qᵀ``."""
    (qg, sg), (qu, su), (qd, sd) = bases
    dt = x.dtype
    zg = ((x * sg.astype(dt)) @ qg.astype(dt))[token]
    zu = ((x * su.astype(dt)) @ qu.astype(dt))[token]
    acc = swiglu_experts(
        zg, zu, sizes, kern, backend=backend, interpret=interpret, tm=tm, splits=splits
    )
    acc = jnp.zeros((x.shape[0], acc.shape[1]), jnp.float32).at[token].add(acc)
    return (acc.astype(dt) @ qd.astype(dt).T) * sd.astype(dt)


def bf16_layer(x, token, sizes, gate, up, down):
    y = bf16_experts(x, token, sizes, gate, up, down)
    return jnp.zeros((x.shape[0], y.shape[1]), jnp.float32).at[token].add(y)


# ------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class ShapeBench:
    """The dense bf16 experts, 8-bit bases and jitted paths of one layer shape (built once)."""

    shape: Shape
    gate: jax.Array
    up: jax.Array
    down: jax.Array
    bases: tuple
    layouts: dict  # bpw -> (kern on device, packed on device, kern on host)

    @classmethod
    def build(cls, shape: Shape, seed: int = 0) -> ShapeBench:
        e, d, f = shape.experts, shape.hidden, shape.inter
        k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)

        def dense(k, s):
            return (jax.random.normal(k, s, jnp.bfloat16) * 0.02).astype(jnp.bfloat16)

        bases = tuple(
            (
                jax.random.randint(kk, (d, d), -127, 128, jnp.int32).astype(jnp.int8),
                jnp.full((d,), 1e-2, jnp.bfloat16),
            )
            for kk in jax.random.split(k4, 3)
        )
        return cls(
            shape, dense(k1, (e, d, f)), dense(k2, (e, d, f)), dense(k3, (e, f, d)), bases, {}
        )


def bench_config(
    sb: ShapeBench,
    bpw: float,
    tokens: int,
    tiles,
    opts: dict,
    iters: int,
    copy_bw: float,
    overhead: list,
    rng: np.random.Generator,
    layer: bool,
    seed: int = 0,
) -> dict:
    """One (shape, budget, token count): the Pallas kernels vs XLA dequantize-then-matmul vs
    bf16."""
    shape = sb.shape
    e, d, f = shape.experts, shape.hidden, shape.inter
    if bpw not in sb.layouts:
        allocs, kern = synthetic_kernels(shape, bpw, tiles, seed)
        packed = {p: synthetic_packed(allocs[p], f, rng) for p in allocs}
        overhead.append(layout_overhead(shape, bpw, allocs, kern))
        sb.layouts[bpw] = (
            jax.device_put(jax.tree.map(jnp.asarray, kern)),
            jax.device_put(packed),
            kern,
        )
    kern_dev, packed_dev, kern = sb.layouts[bpw]
    token, sizes = routing(tokens, shape, rng)
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, d), jnp.bfloat16)
    z = jax.random.normal(jax.random.PRNGKey(tokens + 1), (token.size, d), jnp.bfloat16)
    tok_d, sizes_d = jnp.asarray(token), jnp.asarray(sizes)
    t0 = time.perf_counter()
    f_kernel = jax.jit(functools.partial(swiglu_experts, **opts))
    jax.block_until_ready(f_kernel(z, z, sizes_d, kern_dev))
    compile_s = time.perf_counter() - t0
    t_k = time_fn(f_kernel, z, z, sizes_d, kern_dev, iters=iters)
    t_x = time_fn(jax.jit(xla_experts, static_argnums=4), z, z, sizes_d, packed_dev, e, iters=iters)
    t_b = time_fn(jax.jit(bf16_experts), x, tok_d, sizes_d, sb.gate, sb.up, sb.down, iters=iters)
    row = dict(
        shape=shape.name,
        bpw=bpw,
        tokens=tokens,
        pallas_us=t_k * 1e6,
        xla_us=t_x * 1e6,
        bf16_us=t_b * 1e6,
        x_bf16=t_b / t_k,
        x_xla=t_x / t_k,
        layer_q_us=float("nan"),
        layer_bf16_us=float("nan"),
        layer_x=float("nan"),
        compile_s=compile_s,
    )
    if layer:
        t_lq = time_fn(
            jax.jit(functools.partial(quantized_layer, **opts)),
            x,
            tok_d,
            sizes_d,
            sb.bases,
            kern_dev,
            iters=iters,
        )
        t_lb = time_fn(jax.jit(bf16_layer), x, tok_d, sizes_d, sb.gate, sb.up, sb.down, iters=iters)
        row.update(layer_q_us=t_lq * 1e6, layer_bf16_us=t_lb * 1e6, layer_x=t_lb / t_lq)
    nbytes = routed_bytes(kern, sizes)
    bw = nbytes / t_k
    row.update(routed_mb=nbytes / 1e6, gbps=bw / 1e9, pct_copy=100 * bw / copy_bw)
    return row


def plan_configs(
    shapes, bpws, token_counts, quick: bool, prefill: int
) -> list[tuple[Shape, float, int]]:
    """The configurations in the order they run. ``quick``: the bar first (Mixtral-8x7B, 2.5 bpw, 1
    token), then decode 8 and prefill at 2.5 bpw, the other shape, and the other budgets at 1
    token."""
    if not quick:
        return [(s, b, t) for s in shapes for b in bpws for t in token_counts]
    first, *rest = shapes
    plan = [(first, 2.5, 1), (first, 2.5, 8), (first, 2.5, prefill)]
    plan += [(s, 2.5, t) for s in rest for t in (1, prefill)]
    plan += [(s, b, 1) for s in shapes for b in bpws if b != 2.5]
    return plan


def correctness_check(backend: str, interpret: bool) -> bool:
    """The compiled kernels against the pure-jnp reference on a real packed layer (E=8, r=256,
    F=512).

    GPU: the decode GEMVs with 1 row per tile (split grid, f32) and 4 rows (unsplit, bf16), and the
    prefill path (f32 and bf16). Each case compiles its own kernels (about half a minute each), so
    the list is short. Printed; False on failure."""
    rng = np.random.default_rng(7)
    e, r, f = 8, 256, 512
    packed, dense = {}, {}
    for p in ("gate", "up", "down"):
        units = (rng.standard_normal((e * r, f)) * 0.05).astype(np.float32)
        packed[p] = pack_segments(units, rng.choice([0, 1, 2, 3, 4, 8], size=e * r), GROUP)
        dense[p] = dequantize_packed(packed[p]).reshape(e, r, f)
    kern = jax.device_put(build_expert_kernels(packed, e, backend=backend))
    tols = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
    if backend == "triton":
        cases = [
            (jnp.float32, 2, None),
            (jnp.bfloat16, 32, 1),
            (jnp.float32, 128, None),
            (jnp.bfloat16, 128, None),
        ]
    else:
        cases = [(jnp.float32, 2, None), (jnp.bfloat16, 128, None)]
    ok = True
    for dtype, rows, splits in cases:
        sizes = (
            np.full(e, rows // e, np.int32)
            if rows >= e
            else np.bincount(rng.choice(e, rows, replace=False), minlength=e).astype(np.int32)
        )
        zg, zu = (jnp.asarray(rng.standard_normal((rows, r)), dtype) for _ in range(2))
        want = swiglu_experts_reference(
            zg.astype(jnp.float32),
            zu.astype(jnp.float32),
            jnp.asarray(sizes),
            dense["gate"],
            dense["up"],
            dense["down"],
        )
        fn = jax.jit(
            functools.partial(swiglu_experts, backend=backend, interpret=interpret, splits=splits)
        )
        t0 = time.perf_counter()
        got = jax.block_until_ready(fn(zg, zu, jnp.asarray(sizes), kern))
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        good = bool(np.isfinite(rel) and rel <= tols[dtype])
        ok &= good
        print(
            f"correctness {jnp.dtype(dtype).name} rows={rows} splits={splits}: max rel err "
            f"{rel:.2e} "
            f"(tol {tols[dtype]:.0e}) {'ok' if good else 'FAILED'} ({time.perf_counter() - t0:.0f} "
            "s with compile)",
            flush=True,
        )
    return ok


def end_to_end(new_tokens: int, prompt_len: int) -> tuple[float, float]:
    """Greedy decode tokens/s: reference model bf16 vs its experts quantized at ~2.5 bits
    (Pallas)."""
    rng = np.random.default_rng(0)
    model, config = load_model(REFERENCE_DIR, dtype=jnp.bfloat16)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, size=(1, prompt_len)), jnp.int32)

    def rate(m) -> float:
        greedy_generate(m, prompt, new_tokens).block_until_ready()  # compile
        t0 = time.perf_counter()
        greedy_generate(m, prompt, new_tokens).block_until_ready()
        return new_tokens / (time.perf_counter() - t0)

    bf16_rate = rate(model)
    for layer in model.layers:
        ex = layer.mlp.experts
        dense = [np.asarray(getattr(ex, p)[...], np.float32) for p in ("gate", "up", "down")]
        e, d, _ = dense[0].shape
        bits = {
            p: random_allocation(e, d, 2.5 - 16 / GROUP, seed=i)
            for i, p in enumerate(("gate", "up", "down"))
        }
        layer.mlp.experts = quantized_from_dense(*dense, bits, rng, GROUP)
    set_backend(model, kernel_backend_for())  # the kernels, also where "auto" would still pick XLA
    return bf16_rate, rate(model)


def _row_line(r: dict) -> str:
    def num(v: float, fmt: str = ".1f", suffix: str = "") -> str:
        return (
            "–" if v != v else f"{v:{fmt}}{suffix}"
        )  # NaN: not measured (--quick skips the layer columns)

    return (
        f"| {r['shape']} | {r['bpw']:.1f} | {r['tokens']} | {r['pallas_us']:.1f} | "
        f"{r['xla_us']:.1f} | {r['bf16_us']:.1f} "
        f"| {r['x_bf16']:.2f}x | {r['x_xla']:.2f}x | {num(r['layer_q_us'])} | "
        f"{num(r['layer_bf16_us'])} "
        f"| {num(r['layer_x'], '.2f', 'x')} | {r['routed_mb']:.2f} | {r['gbps']:.1f} | "
        f"{r['pct_copy']:.0f}% "
        f"| {num(r.get('compile_s', float('nan')), '.0f')} |"
    )


HEADER = (
    "| shape | bpw | tokens | pallas µs | xla dequant µs | bf16 ragged_dot µs | bf16/pallas | "
    "xla/pallas "
    "| layer q µs | layer bf16 µs | layer bf16/q | routed packed MB | GB/s | % copy BW | compile s "
    "|\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def write_report(
    path: str,
    title: str,
    copy_bw: float,
    correct: bool,
    rows: list[dict],
    overhead: list,
    extra: str = "",
) -> None:
    """The table so far, as markdown (written whole each time: a run cut short keeps its rows)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(
            f"{title}\n\ncopy bandwidth {copy_bw / 1e9:.1f} GB/s; correctness check "
            f"{'passed' if correct else 'FAILED (timings not valid)'}\n"
        )
        print(HEADER)
        for r in rows:
            print(_row_line(r))
        if overhead:
            print_overhead(overhead)
        if extra:
            print(f"\n{extra}")
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        fh.write(buf.getvalue())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU interpret mode, tiny shapes")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument(
        "--prefill", type=int, default=512, help="prefill tokens (>= 512 for the report)"
    )
    ap.add_argument("--shapes", default=None, help="comma-separated subset of shape names")
    ap.add_argument("--bpw", default=None, help="comma-separated budgets (default 2.0,2.5,3.0)")
    ap.add_argument(
        "--tokens", default=None, help="comma-separated token counts (default 1,2,4,8,<prefill>)"
    )
    ap.add_argument(
        "--tm",
        type=int,
        default=None,
        help="force the kernels' row tile (GPU: ≤ 4 GEMV, more: dequantize path)",
    )
    ap.add_argument(
        "--splits",
        type=int,
        default=None,
        help="force the GPU reduction split (1: one program per block)",
    )
    ap.add_argument(
        "--tile-rows", type=int, default=None, help="TPU: gate/up components per tile (layout)"
    )
    ap.add_argument(
        "--tile-lanes", type=int, default=None, help="TPU: down components per tile (layout)"
    )
    ap.add_argument(
        "--tile", type=int, default=None, help="GPU: components per tile of the code layout"
    )
    ap.add_argument(
        "--quick", action="store_true", help="the bar first, then a short list (see plan_configs)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new configuration after this many seconds",
    )
    ap.add_argument("--cache", default=None, help="persistent compilation cache directory")
    ap.add_argument("--out", default=None, help="markdown report, rewritten after every row")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode measurement")
    ap.add_argument(
        "--layout-only",
        action="store_true",
        help="only the layout-overhead tables (CPU, full shapes)",
    )
    args = ap.parse_args(argv)
    smoke = args.smoke
    if args.layout_only:  # CPU, seconds: tables only, no words allocated, nothing timed
        for backend in ("triton", "mosaic_tpu"):
            print(f"\n{backend} tiles: {DEFAULT_TILES[backend]}")
            print_overhead(
                [
                    layout_overhead(
                        shape,
                        bpw,
                        *synthetic_kernels(shape, bpw, DEFAULT_TILES[backend], abstract=True),
                    )
                    for shape in FULL_SHAPES
                    for bpw in (2.0, 2.5, 3.0)
                ]
            )
        return 0
    backend = kernel_backend_for()
    interpret = jax.default_backend() == "cpu"
    if interpret and not smoke:
        print("no accelerator: run with --smoke (interpret mode) on CPU", file=sys.stderr)
        return 2
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = tuple(s for s in shapes if s.name in wanted)
    tiles = DEFAULT_TILES[backend]
    if backend == "triton" and args.tile:
        tiles = CodeConfig(tile=args.tile)
    elif args.tile_rows or args.tile_lanes:
        tiles = dataclasses.replace(
            tiles,
            tile_rows=args.tile_rows or tiles.tile_rows,
            tile_lanes=args.tile_lanes or tiles.tile_lanes,
        )
    iters = args.iters or (2 if smoke else 20)
    bpws = (
        tuple(float(b) for b in args.bpw.split(","))
        if args.bpw
        else ((2.5,) if smoke else (2.0, 2.5, 3.0))
    )
    token_counts = (
        tuple(int(t) for t in args.tokens.split(","))
        if args.tokens
        else ((1, 8, 64) if smoke else (1, 2, 4, 8, args.prefill))
    )
    if args.cache:  # compiled kernels survive a rerun on the same machine
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    device = jax.devices()[0]
    title = (
        f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, kernels: "
        f"{backend}"
        f"{' (interpret)' if interpret else ''}"
    )
    print(title, flush=True)
    correct = correctness_check(backend, interpret)
    copy_bw = copy_bandwidth((16 << 20) if smoke else (2 << 30), iters)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows: list[dict] = []
    overhead: list[tuple] = []
    print(HEADER, flush=True)
    deadline = time.perf_counter() + (args.budget_s or float("inf"))
    opts = dict(backend=backend, interpret=interpret, tm=args.tm, splits=args.splits)
    rng = np.random.default_rng(0)
    built: dict[str, ShapeBench] = {}
    for shape, bpw, tokens in plan_configs(shapes, bpws, token_counts, args.quick, args.prefill):
        if time.perf_counter() > deadline:
            print(
                f"time budget reached: not started {shape.name} {bpw} bpw {tokens} tokens and "
                "later ones",
                flush=True,
            )
            break
        if shape.name not in built:
            built.clear()  # one shape's dense experts on the device at a time
            built[shape.name] = ShapeBench.build(shape)
        rows.append(
            bench_config(
                built[shape.name],
                bpw,
                tokens,
                tiles,
                opts,
                iters,
                copy_bw,
                overhead,
                rng,
                layer=not args.quick,
            )
        )
        print(_row_line(rows[-1]), flush=True)
        if args.out:
            write_report(args.out, title, copy_bw, correct, rows, overhead)
    print_overhead(overhead)
    if not args.no_e2e:
        bf16_rate, q_rate = end_to_end(new_tokens=4 if smoke else 64, prompt_len=8 if smoke else 32)
        line = (
            f"end-to-end greedy decode, reference model (3 layers, D=F=256, 16 experts), batch 1: "
            f"bf16 {bf16_rate:.1f} tok/s, quantized ~2.5 bpw (Pallas) {q_rate:.1f} tok/s "
            f"({q_rate / bf16_rate:.2f}x)"
        )
        print(f"\n{line}")
        if args.out:
            write_report(args.out, title, copy_bw, correct, rows, overhead, extra=line)
    print(f"\ndevice: {device.device_kind}; copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    if not correct:
        print(
            "KERNEL CORRECTNESS CHECK FAILED (see the lines at the top): timings above are not "
            "valid",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
