"""Static cost of the GPU kernels, without a GPU: instructions per byte of weights in their inner
loops.

    pip install triton==3.6.0      # CPU is enough: its wheel carries ptxas, cuobjdump and nvdisasm
    python bench/triton_sass.py --shape Mixtral-8x7B --tokens 1 --bpw 2.5

The decode GEMVs are lowered for CUDA at a full layer shape, as `jax.export` does. The Triton IR
that Pallas hands to XLA is captured and compiled for sm_90 by the `triton` package. Each loop of
the SASS is read back:

* one loop per code width, gate then up for the first kernel, down for the second;
* its instruction mix and registers, and whether anything spills;
* **instructions per byte**: the loop's SASS instructions over the bytes of words one thread reads
  per iteration. That is a ``[W_b, C]`` block of one scale group spread over ``32·num_warps``
  threads.
* **issue-bound ceiling**: ``SMs × 4 schedulers × 32 lanes × clock / (instructions per byte)``. No
  kernel can stream weights faster than this, however fast its memory. Beside it is the H200's
  measured copy bandwidth (about 4.3 TB/s here).

This is an estimate. It says whether a kernel *can* reach a bandwidth, not that it does:
`bench/kernels.py` on the GPU measures it. The compiler is pip Triton, not the fork inside jaxlib,
so the code can differ in detail. The old bit-plane kernel ran at about 62 instructions per byte by
this script (git 8de0c04, gate/up, 2 bits); the code layout exists because of that figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from kernels import (
    FULL_SHAPES,
    synthetic_kernels,
)  # bench/kernels.py: the same shapes and allocations

from pallas_kernels import shared_shapes
from pallas_kernels.api import DEFAULT_TILES, ExpertKernels, swiglu_experts
from pallas_kernels.lowered import export_for_hardware
from pallas_kernels.triton.layout import CodeConfig, codes_per_word, words_per_group

SHAPES = {s.name: s for s in FULL_SHAPES}
H100_H200 = dict(sms=132, clock_hz=1.98e9)  # the same SM count and boost clock on both


@contextlib.contextmanager
def triton_ir_capture():
    """Collects the Triton IR (text) of every Pallas kernel lowered inside the block, in order.
    Hooks the Pallas Triton lowering (a private JAX function; checked, not assumed)."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    lowering = reg.lowering
    original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if original is None:
        raise SystemExit(
            "this JAX has no pallas.triton lowering.lower_jaxpr_to_triton_module to hook"
        )
    modules: list[str] = []

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def capture_triton_ir(
    shape: str, tokens: int, bpw: float, tile: int
) -> tuple[list[str], ExpertKernels]:
    """Triton IR of every Pallas kernel in the GPU forward at this shape (decode GEMVs for ≤ 4 rows
    per expert)."""
    sh = SHAPES[shape]
    _, kern = synthetic_kernels(sh, bpw, CodeConfig(tile), abstract=True)
    z = jax.ShapeDtypeStruct((tokens * sh.top_k, sh.hidden), jnp.bfloat16)
    fn = jax.jit(functools.partial(swiglu_experts, backend="triton", interpret=False))
    with triton_ir_capture() as modules:
        export_for_hardware(
            fn,
            "triton",
            z,
            z,
            jax.ShapeDtypeStruct((sh.experts,), jnp.int32),
            shared_shapes.abstract(kern),
        )
    return modules, kern


def triton_compile(ttir: str, num_warps: int, num_stages: int, tmp: str):
    """One Triton IR module compiled for sm_90 by pip Triton (its IR file written under ``tmp``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as fh:
        fh.write(ttir)
    return triton.compile(
        path,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )


def compile_sass(ttir: str, num_warps: int, num_stages: int) -> tuple[str, str]:
    """(SASS text, resource usage line) of one Triton IR module for sm_90."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        compiled = triton_compile(ttir, num_warps, num_stages, tmp)
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        sass = subprocess.run(
            [os.path.join(tools, "nvdisasm"), "-c", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        res = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True
        ).stdout
    usage = next((ln.strip() for ln in res.splitlines() if "REG:" in ln), "")
    return sass, usage


def sass_loops(sass: str) -> list[tuple[collections.Counter, int | None]]:
    """Each loop body (a backward branch to an earlier label), in code order: its op counts and the
    code width it decodes (`loop_width`)."""
    labels, ins, pending = {}, [], []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr, text = int(m.group(1), 16), m.group(2).strip()
            for p in pending:
                labels[p] = addr
            pending = []
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            ins.append((addr, op.split(".")[0], text))
    index = {a: i for i, (a, _, _) in enumerate(ins)}
    loops = []
    for i, (addr, op, text) in enumerate(ins):
        target = re.search(r"(\.L_x_\d+)", text) if op == "BRA" else None
        if target and labels.get(target.group(1), addr) < addr:
            body = ins[index[labels[target.group(1)]] : i + 1]
            loops.append(
                (
                    collections.Counter(o for _, o, _ in body),
                    loop_width([t for _, o, t in body if o == "LOP3"]),
                )
            )
    return loops


def loop_width(lop3: list[str]) -> int | None:
    """The code width a decode loop unpacks, read from its LOP3 masks ``(2^b − 1) << s``: the most
    common popcount of their immediates. ptxas orders the per-width branches of a kernel as it likes
    (down's came out 1, 3, 2, 4, 8), so loops are matched to widths by this, not by position."""
    counts = collections.Counter()
    for text in lop3:
        for imm in re.findall(r",\s*(0x[0-9a-f]+)\s*,", text)[
            :1
        ]:  # the first immediate operand: the mask
            counts[bin(int(imm, 16)).count("1")] += 1
    return counts.most_common(1)[0][0] if counts else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="Mixtral-8x7B", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--bpw", type=float, default=2.5)
    ap.add_argument("--tile", type=int, default=DEFAULT_TILES["triton"].tile)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument(
        "--copy-gbps",
        type=float,
        default=4300.0,
        help="measured copy bandwidth to compare with (H200 here)",
    )
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("needs the triton package (CPU is fine): pip install triton==3.6.0", file=sys.stderr)
        return 2
    modules, kern = capture_triton_ir(args.shape, args.tokens, args.bpw, args.tile)
    threads = 32 * args.warps
    rate = H100_H200["sms"] * 4 * 32 * H100_H200["clock_hz"]  # thread-instructions per second
    gs = kern.gate.group_size
    print(
        f"{args.shape}, {args.tokens} token(s), {args.bpw} bpw, tile {args.tile}, {args.warps} "
        "warps: "
        f"{len(modules)} kernels\n"
    )
    print(
        "| kernel | width | instrs/iter | words B/thread/iter | instrs/B | issue-bound GB/s | % of "
        "copy | top ops |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = ["gate/up", "down"]
    weighted = []
    for kind, (ttir, widths) in enumerate(
        zip(modules, [kern.gate.widths + kern.up.widths, kern.down.widths], strict=False)
    ):
        layouts = (
            [kern.gate] * len(kern.gate.widths) + [kern.up] * len(kern.up.widths)
            if kind == 0
            else [kern.down] * len(widths)
        )
        sass, usage = compile_sass(ttir, args.warps, args.stages)
        loops = sass_loops(sass)
        found = sorted(b for _, b in loops if b is not None)
        if found != sorted(widths):
            print(
                f"{names[kind]}: loops decode widths {[b for _, b in loops]}, the kernel has "
                f"{widths}: cannot pair them",
                file=sys.stderr,
            )
            continue
        # a width's loops keep the kernel's order among themselves (gate before up)
        pending = collections.defaultdict(list)
        for ops, b in loops:
            pending[b].append(ops)
        for b, layout in zip(widths, layouts, strict=False):
            ops = pending[b].pop(0)
            n = sum(ops.values())
            nbytes = words_per_group(b, gs) * args.tile * 4 / threads
            per_byte = n / nbytes
            top = ", ".join(f"{o} {c}" for o, c in ops.most_common(5))
            if (
                ops["LDL"] + ops["STL"]
            ):  # register spills inside the loop: local-memory traffic per iteration
                top += f"; spills: LDL {ops['LDL']}, STL {ops['STL']}"
            gbps = rate / per_byte / 1e9
            print(
                f"| {names[kind]} | {b} ({codes_per_word(b)}/word) | {n} | {nbytes:.0f} | "
                f"{per_byte:.1f} | {gbps:.0f} "
                f"| {100 * gbps / args.copy_gbps:.0f}% | {top} |"
            )
            tile_bits = np.asarray(layout.tile_bits)[: int(np.asarray(layout.expert_ntiles).sum())]
            width_bytes = float((tile_bits == b).sum()) * words_per_group(
                b, gs
            )  # word rows per group, all tiles
            weighted.append((width_bytes, per_byte))
        print(f"\n{names[kind]} resources: {usage}\n")
    total = sum(w for w, _ in weighted)
    if total:
        per_byte = sum(w * p for w, p in weighted) / total
        gbps = rate / per_byte / 1e9
        print(
            "all three projections, weighted by this allocation's word bytes per width: "
            f"{per_byte:.1f} instructions "
            f"per byte, issue-bound ceiling {gbps:.0f} GB/s ({100 * gbps / args.copy_gbps:.0f}% of "
            f"{args.copy_gbps:.0f} GB/s copy)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
