"""Memory and time of one whole-model allocation, per unit: what `budget_scope="auto"` is sized by.

    python bench/allocation_memory.py [--layers 8 --experts 128 --rank 2048] [--budget 2.0]

Builds the loss tables of `--layers` synthetic MoE layers (`--experts` × 3 projections × `--rank`
units each, losses κ_b · ‖unit‖² with heavy-tailed norms, the default candidate widths and their
stored bits at F = 768), then runs the whole-model allocation (`allocate_layers`, scope "model",
greedy: the bisection on the units' budget the runs use) in this process, and prints the resident
memory it added above the tables (VmHWM after minus VmRSS before; the tables themselves are the
layer problems' and not counted) and its time, in total and per unit. Run it with `PYTHONPATH`
pointing at another checkout to compare two versions on the same machine.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
from rss_profile import rss_bytes  # bench/, beside this script

from bitsmoe_jax.method.coefficients import PROJECTIONS, Coefficients
from bitsmoe_jax.method.heap import release_freed_memory
from bitsmoe_jax.method.layer_problem import LayerProblem, allocate_layers
from bitsmoe_jax.method.quantizers import stored_bits
from bitsmoe_jax.method.unit_store import NoUnits

CANDS = (0, 1, 2, 3, 4, 5, 6, 8)
KAPPA = np.array([1.0, 0.36, 0.12, 0.035, 0.009, 0.0023, 0.0006, 0.00004])


def layer(index: int, experts: int, rank: int, hidden: int, inter: int, seed: int) -> LayerProblem:
    rng = np.random.default_rng(seed)
    loss = {
        p: rng.lognormal(0, 1.5, (experts, rank, 1)) * KAPPA[None, None, :] for p in PROJECTIONS
    }
    return LayerProblem(
        index=index,
        num_experts=experts,
        hidden=hidden,
        inter=inter,
        store=NoUnits({p: rank for p in PROJECTIONS}),
        coeffs=Coefficients(
            loss=loss,
            cost=np.array([stored_bits(inter, b, 128) for b in CANDS], np.int64),
            candidates=CANDS,
            mode="sampled",
        ),
        bases={p: {} for p in PROJECTIONS},  # no basis to shrink: the units alone
        basis_bits=8,
        stats=None,  # not read by the allocation
        super_experts=[],
        super_bits=8,
        group_size=128,
    )


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--layers", type=int, default=8)
    a.add_argument("--experts", type=int, default=128)
    a.add_argument("--rank", type=int, default=2048)
    a.add_argument("--inter", type=int, default=768)
    a.add_argument("--budget", type=float, default=2.0)
    args = a.parse_args()
    problems = [
        layer(i, args.experts, args.rank, args.rank, args.inter, i) for i in range(args.layers)
    ]
    units = args.layers * args.experts * 3 * args.rank
    gc.collect()
    release_freed_memory()
    before = rss_bytes("VmRSS")
    t = time.perf_counter()
    out = allocate_layers(problems, args.budget, "model", {"allocator": "greedy"})
    secs = time.perf_counter() - t
    added = rss_bytes("VmHWM") - before
    gap = out[0][1][0].gap if out[0][1] else 0.0
    print(
        f"{units:,} units ({args.layers} layers × {args.experts} experts × 3 × {args.rank}): "
        f"allocation added {added / 2**30:.2f} GiB above the tables ({added / units:.0f} B a "
        f"unit), {secs:.1f} s ({secs / units * 1e6:.1f} µs a unit); certified gap {gap:.1e}"
    )


if __name__ == "__main__":
    main()
