"""Budgets of a run: their output directories, the model-scope allocation, and the layers packed at
budgets after the first (spread over the processes of a multi-process run)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.expert_scale_tuning import TuningStats
from bitsmoe_jax.method.expert_source import plan_chunk
from bitsmoe_jax.method.layer_problem import (
    LayerProblem,
    allocate_layers,
)
from bitsmoe_jax.method.packing import dequantize_bucket, dequantize_packed
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import ExpertFn, expert_activation
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.workdir import WorkDir, allocation_records
from bitsmoe_jax.serve.quantized_experts import pack_layer


def budget_dirs(run: RunConfig) -> list[tuple[float, Path]]:
    budgets = run.budget_bits if isinstance(run.budget_bits, (tuple, list)) else (run.budget_bits,)
    out = Path(run.output_dir)
    if len(budgets) == 1:
        return [(float(budgets[0]), out)]
    return [(float(b), out / f"bpw_{float(b):.2f}") for b in budgets]


def model_allocation(
    run: RunConfig,
    config: ModelConfig,
    budget: float,
    work: WorkDir,
    tables: WorkDir | None = None,
) -> tuple[dict, list[dict[str, Any]], float]:
    """(bits per MoE layer, allocation records, seconds) of a model-scope budget: solved once by
    process 0 over every layer's loss tables (memory-mapped; of the problems the layer pass stored,
    or those of the whole-model budget's tables pass in `tables`) and committed, or read back from
    the work directory."""
    if not work.has_model_allocation(budget):
        t = time.time()
        solution = allocate_layers(
            [(tables or work).load_problem(i) for i in config.moe_layers],
            budget,
            "model",
            run.params.allocator_options(),
        )
        bits = {i: solution[i][0] for i in config.moe_layers}
        records = allocation_records(solution[config.moe_layers[0]][1])
        seconds = time.time() - t
        work.commit_model_allocation(budget, bits, records, seconds)
        return bits, records, seconds
    return work.load_model_allocation(budget)


def pack_later_budgets(
    run: RunConfig, config: ModelConfig, budgets: list[tuple[float, Path]], work: WorkDir
) -> None:
    """Multi-process runs: the layers packed at output time, spread round-robin over the processes.

    Once the layer pass is done, those layers are independent of each other: a layer-scope budget
    after the first re-solves each layer's own allocation from its stored problem; a model-scope
    budget's one allocation over all layers is solved by process 0, committed and broadcast. Process
    p packs MoE layers p, p+P, ... — allocation and error feedback, the expensive part of writing an
    output — and commits them to the work directory; process 0 then streams them into the outputs
    (and packs itself any layer it does not find there, e.g. with a work directory that is not on a
    shared filesystem). Resumable like the layers.
    """
    me, count = distributed.process_index(), distributed.process_count()
    moe = list(config.moe_layers)
    todo = budgets[1:]  # the first budget is packed by the layer pass, whatever the scope
    for b, _ in todo:
        if work.output_report(b) is not None:
            continue
        model_solution = None
        if run.budget_scope == "model":
            if distributed.is_writer():
                bits, _, _ = model_allocation(run, config, b, work)
                tree = {str(i): bits[i] for i in moe}
            else:  # the shapes of process 0's answer, for the broadcast
                tree = {
                    str(i): {q: np.zeros((p.num_experts, p.rank(q)), np.int64) for q in PROJECTIONS}
                    for i, p in ((i, work.load_problem(i)) for i in moe)
                }
            # process 0 reports the model allocation's records; the layers carry none
            model_solution = {
                int(i): (v, []) for i, v in distributed.broadcast_from_writer(tree).items()
            }
        for j, i in enumerate(moe):
            if j % count != me or work.has_budget_layer(b, i):
                continue
            seconds = {"allocation": 0.0, "pack": 0.0}
            fn = dense_expert_fn(config, work.load_dense(i))
            packed = pack_at_budget(run, work, i, b, model_solution, seconds, fn)
            work.commit_budget_layer(b, i, packed, seconds)
            packed = None
            release_layer_executables()
        distributed.log(
            f"budget {b:.2f}: MoE layers packed by {count} processes ("
            + "; ".join(
                f"process {p}: layers {[i for j, i in enumerate(moe) if j % count == p]}"
                for p in range(count)
            )
            + ")"
        )
    distributed.barrier("later_budgets_packed")


def problem_summary(p: LayerProblem, tuning: TuningStats | None = None) -> dict[str, Any]:
    """The layer's record in the report (with what the scale tuning did, when it ran)."""
    extra = {"scale_tuning": tuning.to_json()} if tuning is not None and tuning.experts else {}
    if p.basis_choice is not None:
        extra["basis_choice"] = {"predicted_loss": dict(p.basis_choice)}
    return {
        **extra,
        "basis_bits": int(p.basis_bits),
        "starved_experts": [int(e) for e in p.stats.starved],
        "tokens_per_expert": np.asarray(p.stats.tokens).tolist(),
        "super_experts": [int(e) for e in p.super_experts],
        "rank": {q: p.rank(q) for q in PROJECTIONS},
        "full_rank_units": {q: p.num_experts * p.rank(q) for q in PROJECTIONS},
        "num_weights": p.num_weights,
    }


def layer_result(
    run: RunConfig,
    work: WorkDir,
    i: int,
    budget: float,
    from_packed: bool,
    model_solution,
    timings: dict,
    fn: ExpertFn,
):
    """(experts, bits, allocation records, problem summary) of MoE layer `i` at `budget`, from the
    work dir (`fn`: the layer's `dense_expert_fn`, if it has to be packed here)."""
    if from_packed:
        return work.load_packed(i)
    if work.has_budget_layer(budget, i):  # packed by the process that owns the layer
        qe, bits, allocs, summary, seconds = work.load_budget_layer(budget, i)
        timings["allocation"] += seconds["allocation"]
        timings["pack"] += seconds["pack"]
        return qe, bits, (model_solution[i][1] if model_solution else allocs), summary
    return pack_at_budget(run, work, i, budget, model_solution, timings, fn)


def dense_expert_fn(config: ModelConfig, dense: dict) -> ExpertFn:
    """The `ExpertFn` of MoE layer params as stored (GPT-OSS's expert biases at the dense dtype,
    as the quantized checkpoint holds and runs them)."""
    return ExpertFn.of(expert_activation(config), dense.get("mlp", {}).get("expert_bias"))


def pack_at_budget(
    run: RunConfig,
    work: WorkDir,
    i: int,
    budget: float,
    model_solution,
    timings: dict,
    fn: ExpertFn,
):
    """Allocate (unless `model_solution` has the layer's bits) and pack MoE layer `i` from its
    stored
    problem; (experts, bits, allocation records, problem summary), stage seconds added to
    `timings`; `fn`: the layer's `dense_expert_fn`."""
    problem = work.load_problem(i)
    t = time.time()
    bits, allocs = (
        model_solution
        or allocate_layers([problem], budget, "layer", run.params.allocator_options())
    )[i]
    timings["allocation"] += time.time() - t
    t = time.time()
    stats = TuningStats()
    tuning = run.params.scale_tuning()
    qe = pack_layer(
        problem, bits, chunk=packing_chunk(run, problem), fn=fn, tuning=tuning, stats=stats
    )
    timings["pack"] += time.time() - t - stats.seconds
    if tuning is not None:
        timings["scale_tuning"] = timings.get("scale_tuning", 0.0) + stats.seconds
    return qe, bits, allocation_records(allocs), problem_summary(problem, stats)


def packing_chunk(run: RunConfig, problem: LayerProblem) -> int:
    """Experts rounded at a time when a stored problem is packed on this process's first device."""
    plan = plan_chunk(
        problem.hidden,
        problem.inter,
        problem.num_experts,
        run.num_calib_tokens,
        run.host_memory_gb,
        run.expert_chunk,
        host_processes=distributed.processes_on_this_host(),
        basis_rank=run.params.basis_rank(problem.hidden),
    )
    return min(problem.num_experts, plan.chunk)


#: how many `dequantize_bucket` programs are kept across layers (one per segment width, bucket
#: size and factor width in use: a few dozen in a run; ~100 KB each)
MAX_BUCKET_PROGRAMS = 256


def release_layer_executables() -> None:
    """Drop the compiled dequantization of the layer just finished: its packed segment shapes are
    the layer's own (they depend on the allocation), so no later layer reuses it, and jit caches
    never shrink — without this, memory grows by a few MB per layer (measured: ~30 MB per layer of a
    small model, together with the per-shape `jnp.asarray` executables `QuantizedExperts` now
    avoids). The bucketed decoder's programs are kept (later layers reuse them; on the shipped
    model that saved 54 of 54 compilations of a run after the first, ~4 s) unless there are more
    than `MAX_BUCKET_PROGRAMS` (jax versions without a cache-size query: always dropped)."""
    dequantize_packed.clear_cache()
    cache_size = getattr(dequantize_bucket, "_cache_size", lambda: MAX_BUCKET_PROGRAMS + 1)
    if cache_size() > MAX_BUCKET_PROGRAMS:
        dequantize_bucket.clear_cache()
    _trim_heap()


def _trim_heap() -> None:
    """Hand the freed layer's memory back to the OS (glibc keeps freed blocks in its arenas).

    Measured on a 2-layer synthetic Mixtral: without it the resident set starts the second layer
    about 4× the layer's float32 size higher than the first, and every later layer peaks that much
    higher. A no-op where there is no glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
