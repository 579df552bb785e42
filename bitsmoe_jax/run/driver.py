"""The layer loop of a quantization run: stream layers, quantize, commit; then the outputs."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.loading import checkpoint_kind, iter_model_parts, model_config
from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.expert_scale_tuning import TuningStats
from bitsmoe_jax.method.expert_source import plan_chunk
from bitsmoe_jax.method.streamed import (
    StreamedExperts,
    StreamedQuantizedExperts,
    build_problem,
)
from bitsmoe_jax.models.assemble import build_layer
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock
from bitsmoe_jax.models.transformer import attention_part
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run import faults, fingerprint, model_scope
from bitsmoe_jax.run.basis_precision import allocate_layer, build_with_basis_choice
from bitsmoe_jax.run.budgets import (
    budget_dirs,
    dense_expert_fn,
    model_allocation,
    pack_later_budgets,
    problem_summary,
    release_layer_executables,
)
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.expert_reader import layer_source
from bitsmoe_jax.run.inputs import calibration_tokens
from bitsmoe_jax.run.outputs import finished_reports, strip_experts, to_dtype, write_outputs
from bitsmoe_jax.run.preflight import check_checkpoint
from bitsmoe_jax.run.progress import LayerProgress
from bitsmoe_jax.run.workdir import WorkDir, default_work_dir
from bitsmoe_jax.serve.quantized_experts import pack_layer
from conversion.hf_checkpoint import HFCheckpoint


def quantize(run: RunConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Quantize `run.model_path` at every budget of `run.budget_bits`; returns the reports.

    Resumable and memory-bounded (see `workdir.py`): each finished layer is committed to the work
    directory with everything needed to continue, and only one layer (plus the calibration
    activations) is ever held in memory — the outputs are written by streaming the committed layers
    back. A rerun of the same command after a kill resumes at the first unfinished layer; its output
    is byte-identical to an uninterrupted run's (orbax's `_CHECKPOINT_METADATA` timestamps and
    `commit_success.txt` aside; stage timings go to `timings.json`).
    """
    distributed.initialize(
        run.distributed
    )  # before anything touches a device (no-op for one process)
    config = model_config(run.model_path)
    if not config.moe_layers:
        raise ValueError(f"{run.model_path}: the model has no MoE layers to quantize")
    if run.budget_scope == "auto":
        scope, why = model_scope.resolve_scope(run.budget_scope, run.params, config)
        if progress:
            distributed.log(why)
        run = dataclasses.replace(run, budget_scope=scope)  # what the work dir and report say
    budgets = budget_dirs(run)
    work = WorkDir(default_work_dir(run), writer=distributed.is_writer())
    resuming = bool(run.resume) and work.root.exists()
    if not resuming and not run.overwrite:
        existing = [d for _, d in budgets if d.exists()]
        if existing:
            finished = finished_reports(run, config, budgets) if run.resume else None
            if finished is None:
                raise FileExistsError(
                    f"{existing[0]}: output exists and was not written by this exact run (another "
                    "model, config, "
                    "calibration or evaluation setting, or another bitsmoe-jax/JAX version; set "
                    "--config.overwrite=True to replace it, or choose another --config.output_dir)"
                )
            work.clear_tombstones()  # the run was killed while deleting its work directory
            distributed.log(
                f"every output ({', '.join(str(d) for _, d in budgets)}) was already written by "
                "this same run "
                "(same model files, config, calibration and evaluation text): nothing to do"
            )
            return finished
    check_checkpoint(run, config, progress)  # before the work directory: nothing to clean up
    if distributed.is_writer():
        resuming = work.open(
            fingerprint.compute(run, config), run.resume, fingerprint.describe_changes
        )
    distributed.barrier("work_dir_opened")
    distributed.processes_on_this_host()  # every process, here: later memory plans read it
    try:
        if not (
            resuming and work.all_outputs_done([b for b, _ in budgets])
        ):  # killed while cleaning up
            _quantize_layers(run, config, budgets, work, progress)
            if distributed.process_count() > 1:
                pack_later_budgets(run, config, budgets, work)
        reports = write_outputs(
            run, config, budgets, work, bool(run.overwrite or resuming), progress
        )
    except BaseException:
        if work.created_now and not work.committed_layers():
            # nothing worth resuming: leave no trace of a run that failed at its start
            work.remove()
        raise
    distributed.barrier("outputs_written")
    work.remove()
    return reports


def _quantize_layers(
    run: RunConfig,
    config: ModelConfig,
    budgets: list[tuple[float, Path]],
    work: WorkDir,
    progress: bool,
) -> None:
    """Quantize and commit every layer from the first uncommitted one on (a no-op when all are
    done)."""
    total = config.num_hidden_layers
    start = work.next_layer()
    if start >= total:
        return
    keep_problems = len(budgets) > 1  # later budgets pack the layers' stored problems again
    first_budget = budgets[0][0]
    fixed = None
    # two passes (`model_scope.py`): the tables, then the layers; with one MoE layer the model's
    # allocation is the layer's own, made in the layer pass
    if run.budget_scope == "model" and len(config.moe_layers) > 1:
        tables = model_scope.tables_dir(work)
        if not work.has_model_allocation(first_budget):
            if progress:
                distributed.log(
                    "whole-model budget (budget_scope='model'): pass 1 of 2 makes every MoE "
                    "layer's loss tables on the unquantized model, then one allocation over all "
                    "layers chooses the bits; pass 2 quantizes each layer at its bits"
                )
            _run_pass(
                run,
                config,
                tables,
                tables.next_layer(),
                keep_problems=False,
                first_budget=first_budget,
                progress=progress,
                tables_only=True,
            )
            distributed.barrier("scope_tables_done")
            if distributed.is_writer():
                model_allocation(run, config, first_budget, work, tables)
            distributed.barrier("model_allocation_committed")
        fixed = model_scope.FirstBudgetBits(work, tables, first_budget)
    _run_pass(run, config, work, start, keep_problems, first_budget, progress, fixed=fixed)


def _run_pass(
    run: RunConfig,
    config: ModelConfig,
    work: WorkDir,
    start: int,
    keep_problems: bool,
    first_budget: float,
    progress: bool,
    tables_only: bool = False,
    fixed: model_scope.FirstBudgetBits | None = None,
) -> None:
    """One pass of the layer loop from layer `start` on, with its progress display."""
    total = config.num_hidden_layers
    if start >= total:
        return
    label = "pass 1 of 2 (loss tables)" if tables_only else ""
    if fixed is not None:
        label = "pass 2 of 2 (quantize)"
    bar = LayerProgress(total, start, enabled=progress, label=label)
    try:
        _layer_loop(run, config, work, bar, start, keep_problems, first_budget, tables_only, fixed)
    finally:
        bar.close()  # an error's message then starts on a line of its own


def _layer_loop(
    run: RunConfig,
    config: ModelConfig,
    work: WorkDir,
    bar: LayerProgress,
    start: int,
    keep_problems: bool,
    first_budget: float,
    tables_only: bool = False,
    fixed: model_scope.FirstBudgetBits | None = None,
) -> None:
    """Quantize and commit layers `start`, `start + 1`, ... (see `_quantize_layers`).

    `tables_only`: the tables pass of a whole-model budget — each MoE layer's loss tables are
    committed, nothing is packed and the next layer is calibrated on the unquantized layer.
    `fixed`: each MoE layer's bits come from the whole-model allocation instead of its own."""
    mesh = distributed.make_mesh(
        run.mesh_shape
    )  # per-expert stages are sharded over its "expert" axis
    layout = sharded.expert_layout(mesh, config.num_experts)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    plan = plan_chunk(
        config.hidden_size,
        config.moe_intermediate_size,
        config.num_experts,
        run.num_calib_tokens,
        run.host_memory_gb,
        run.expert_chunk,
        local_devices,
        distributed.processes_on_this_host(),
        basis_rank=run.params.basis_rank(config.hidden_size),
    )
    # rounds are collective: every process takes the smallest chunk any process planned
    chunk = distributed.min_over_processes("expert_chunk", min(plan.chunk, layout.per_device))
    # Several processes, one budget (the layer pass of either scope): each holds, forwards and
    # commits only its own experts' packed factors (a stored problem packed again later needs them
    # all instead; the tables pass packs nothing).
    own_only = layout.spans_processes and not keep_problems and not tables_only
    if own_only:
        distributed.log(
            "expert-parallel: each process reads, packs, forwards and commits only its experts ("
            + "; ".join(
                f"process {q}: experts {lo}-{hi - 1}" for lo, hi, q in layout.process_ranges()
            )
            + ")"
        )
    distributed.log(dataclasses.replace(plan, chunk=chunk).describe(config.num_experts))
    # HF directories: experts are read a chunk at a time from their bytes, never as a layer.
    streamed = checkpoint_kind(run.model_path) == "hf"
    ckpt = HFCheckpoint(run.model_path) if streamed else None
    x = jnp.asarray(work.load_x(start - 1)) if start > 0 else None
    for name, part in iter_model_parts(run.model_path, experts=() if streamed else None):
        if name == "top":
            if start == 0:
                t = time.time()
                calib = jnp.asarray(
                    calibration_tokens(
                        run.model_path,
                        run.calib_text,
                        run.num_calib_tokens,
                        run.seq_len,
                        run.tokenizer,
                    )
                )
                x = jnp.take(jnp.asarray(part["embed_tokens"]["embedding"]), calib, axis=0)
                if not (tables_only or work.has_top()):
                    work.commit_top(
                        to_dtype(part, run.dense_dtype), {"tokenize_s": time.time() - t}
                    )
            continue
        i = int(name)
        if i < start:
            continue  # committed by an earlier run (streamed past: the checkpoint is read in order)
        t0 = time.time()
        stages = defaultdict(float)
        source = layer_source(run.model_path, i, config, ckpt, part)
        layer = build_layer(config, i, part)
        resid, moe_in = attention_part(layer, x, config)
        # The layer's input and its attention weights are done with: at hidden 7168 they are
        # 0.6 GiB of float32 that would otherwise stay alive through the whole MoE layer's work.
        is_moe, mlp = layer.is_moe, layer.mlp
        layer = x = None
        stages["forward"] += time.time() - t0
        dense = to_dtype(strip_experts(part), run.dense_dtype)
        del part
        packed = problem = scratch = None
        if is_moe:
            block: MoEBlock = mlp
            fn = dense_expert_fn(config, dense)
            if fn.bias is not None:  # the expert biases as stored: what the quantized model runs
                for k, v in fn.bias.items():
                    getattr(block.expert_bias, k)[...] = jnp.asarray(v)
            keep, params, table = ("tables" if tables_only else "all"), run.params, None
            if fixed is not None:  # built on its tables' bases, packed at the model's bits
                table = fixed.table(i)
                params = fixed.params(table, params)
                if not keep_problems:
                    keep = "units"  # no loss tables to make
            problem, chosen = build_with_basis_choice(
                params,
                functools.partial(
                    build_problem,
                    i,
                    block,
                    source,
                    moe_in.reshape(-1, config.hidden_size),
                    config=config,
                    timings=stages,
                    mesh=mesh,
                    chunk=chunk,
                    gather_units=keep_problems,
                    keep=keep,
                    bases=None if table is None else table.bases,
                ),
                functools.partial(work.scratch, i),
                first_budget,
                stages,
            )
            scratch = problem.store
            if tables_only:
                problem = dataclasses.replace(problem, calib=None)  # committed: tables only
            else:
                t = time.time()
                if fixed is not None:
                    bits, allocs = fixed.take(table, problem)
                else:
                    bits, allocs = chosen or allocate_layer(problem, first_budget, run.params)
                stages["allocation"] += time.time() - t
                t = time.time()
                tuned = TuningStats()
                qe = pack_layer(
                    problem, bits, layout, chunk, fn, run.params.scale_tuning(), tuned, own_only
                )
                stages["pack"] += time.time() - t - tuned.seconds
                if tuned.experts:
                    stages["scale_tuning"] += tuned.seconds
                packed = (qe, bits, allocs, problem_summary(problem, tuned))
                if not keep_problems:
                    problem = None  # its units and weights: not needed past the packing
                    scratch.remove()
            # the tables pass, or not sequential: the next layer calibrates on the original
            # outputs (read again, a chunk at a time)
            if packed is None or not run.sequential:  # each process its experts' rows
                ranges = layout.process_ranges() if layout.spans_processes else None
                block.experts = StreamedExperts(source, chunk, ranges)
            elif own_only or qe.resolved_backend() == "xla":
                # dequantized a chunk of experts at a time; expert-parallel: each process its
                # experts' rows, broadcast to the others (a fresh block has no kernel layout, so
                # "auto" is XLA here on every platform and mesh)
                ranges = layout.process_ranges() if own_only else None
                block.experts = StreamedQuantizedExperts(qe, chunk, ranges)
            else:  # a kernel reads the packed factors as they are
                block.experts = qe
            t = time.time()
            x = resid + block(moe_in)
        else:
            t = time.time()
            x = resid + mlp(moe_in)
        stages["forward"] += time.time() - t
        faults.point("layer_computed")
        t = time.time()
        info = {"index": i, "wall_s": t - t0, "stage_s": dict(stages)}
        if own_only and packed is not None:
            if mine := layout.local_experts():  # a process may hold only padding experts
                work.stage_shard(i, packed[0], mine[0])
            distributed.barrier(f"layer_{i}_shards_staged")
            packed = (None, *packed[1:])  # process 0's commit moves every shard in
        work.commit_layer(
            i,
            {} if tables_only else dense,
            np.asarray(x),
            info,
            packed,
            problem if keep_problems or tables_only else None,
        )
        distributed.barrier(f"layer_{i}_committed")
        if scratch is not None:
            scratch.remove()  # committed (linked into the layer) or already dropped
        stages["commit"] += time.time() - t
        bar.layer_done(i, time.time() - t0, dict(stages))
        mlp = block = problem = packed = dense = resid = moe_in = source = scratch = (
            None  # before the next layer is read
        )
        release_layer_executables()
