"""Run the quantization end to end from a config: stream layers, quantize, write, evaluate,
report."""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.baselines.kquants import check_contractions
from bitsmoe_jax.baselines.run import run_baseline
from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.checkpoint import FORMAT_CONVERTED, META_FILE, atomic_directory, save_tree
from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import iter_model_parts, load_model, model_config
from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.layer_problem import (
    LayerProblem,
    allocate_layers,
    bits_histogram,
    build_problem,
)
from bitsmoe_jax.method.packing import dequantize_packed
from bitsmoe_jax.models.assemble import build_layer
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock
from bitsmoe_jax.models.transformer import attention_part
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run import faults, fingerprint
from bitsmoe_jax.run.progress import LayerProgress
from bitsmoe_jax.run.report import TIMINGS_FILE, write_report
from bitsmoe_jax.run.workdir import WorkDir, allocation_records, default_work_dir
from bitsmoe_jax.serve import quantized_checkpoint as checkpoint_io
from bitsmoe_jax.serve.quantized_experts import pack_layer
from conversion.convert import TOKENIZER_FILES, np_dtype


def calibration_tokens(model_path: str, text: str, num_tokens: int, seq_len: int) -> np.ndarray:
    """[n, seq_len] windows spread evenly over the calibration text (deterministic)."""
    ids = tokenize_text(load_tokenizer(model_path), read_text(text))
    n = max(1, num_tokens // seq_len)
    if len(ids) < seq_len:
        raise ValueError(
            f"calibration text {text!r} has {len(ids)} tokens, fewer than seq_len={seq_len}"
        )
    starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32)


def _strip_experts(layer_params: dict) -> dict:
    dense = {k: v for k, v in layer_params.items() if k != "mlp"}
    if "mlp" in layer_params:
        dense["mlp"] = {k: v for k, v in layer_params["mlp"].items() if k != "experts"}
    return dense


def _to_dtype(tree: Any, dtype: str) -> Any:

    dt = np_dtype(dtype)
    return jax.tree.map(lambda a: np.asarray(a).astype(dt), tree)


def _budget_dirs(cfg: Any) -> list[tuple[float, Path]]:
    budgets = cfg.budget_bits if isinstance(cfg.budget_bits, (tuple, list)) else (cfg.budget_bits,)
    out = Path(cfg.output_dir)
    if len(budgets) == 1:
        return [(float(budgets[0]), out)]
    return [(float(b), out / f"bpw_{float(b):.2f}") for b in budgets]


STAGES = (
    "tokenize",
    "forward",
    "basis",
    "calibration",
    "coefficients",
    "allocation",
    "pack",
    "commit",
    "write",
    "evaluate",
)


def quantize(cfg: Any, progress: bool = True) -> list[dict[str, Any]]:
    """Quantize `cfg.model_path` at every budget of `cfg.budget_bits`; returns the reports.

    Resumable and memory-bounded (see `workdir.py`): each finished layer is committed to the work
    directory with everything needed to continue, and only one layer (plus the calibration
    activations) is ever held in memory — the outputs are written by streaming the committed layers
    back. A rerun of the same command after a kill resumes at the first unfinished layer; its output
    is byte-identical to an uninterrupted run's (orbax's `_CHECKPOINT_METADATA` timestamps and
    `commit_success.txt` aside; stage timings go to `timings.json`).
    """
    distributed.initialize(cfg)  # before anything touches a device (no-op for one process)
    config = model_config(cfg.model_path)
    if not config.moe_layers:
        raise ValueError(f"{cfg.model_path}: the model has no MoE layers to quantize")
    budgets = _budget_dirs(cfg)
    work = WorkDir(default_work_dir(cfg), writer=distributed.is_writer())
    resuming = bool(cfg.resume) and work.root.exists()
    if not resuming and not cfg.overwrite:
        existing = [d for _, d in budgets if d.exists()]
        if existing:
            finished = _finished_reports(cfg, config, budgets) if cfg.resume else None
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
    if distributed.is_writer():
        resuming = work.open(
            fingerprint.compute(cfg, config), cfg.resume, fingerprint.describe_changes
        )
    distributed.barrier("work_dir_opened")
    try:
        if not (
            resuming and work.all_outputs_done([b for b, _ in budgets])
        ):  # killed while cleaning up
            _quantize_layers(cfg, config, budgets, work, progress)
            if distributed.process_count() > 1:
                _pack_later_budgets(cfg, config, budgets, work)
        reports = _write_outputs(
            cfg, config, budgets, work, overwrite=bool(cfg.overwrite or resuming)
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
    cfg: Any, config: ModelConfig, budgets: list[tuple[float, Path]], work: WorkDir, progress: bool
) -> None:
    """Quantize and commit every layer from the first uncommitted one on (a no-op when all are
    done)."""
    total = config.num_hidden_layers
    start = work.next_layer()
    if start >= total:
        return
    keep_problems = len(budgets) > 1 or cfg.budget_scope == "model"
    first_budget = budgets[0][0]
    bar = LayerProgress(total, start, enabled=progress)
    mesh = distributed.make_mesh(cfg)  # per-expert stages are sharded over its "expert" axis
    # Several processes: each reads only its devices' experts; an all-gather completes each layer.
    layout = (
        sharded.expert_layout(mesh, config.num_experts) if distributed.process_count() > 1 else None
    )
    x = jnp.asarray(work.load_x(start - 1)) if start > 0 else None
    for name, part in iter_model_parts(
        cfg.model_path, experts=layout.local_experts() if layout else None
    ):
        if name == "top":
            if start == 0:
                t = time.time()
                calib = jnp.asarray(
                    calibration_tokens(
                        cfg.model_path, cfg.calib_text, cfg.num_calib_tokens, cfg.seq_len
                    )
                )
                x = jnp.take(jnp.asarray(part["embed_tokens"]["embedding"]), calib, axis=0)
                if not work.has_top():
                    work.commit_top(
                        _to_dtype(part, cfg.dense_dtype), {"tokenize_s": time.time() - t}
                    )
            continue
        i = int(name)
        if i < start:
            continue  # committed by an earlier run (streamed past: the checkpoint is read in order)
        t0 = time.time()
        stages = defaultdict(float)
        if layout is not None and "experts" in part.get("mlp", {}):
            part["mlp"]["experts"] = sharded.allgather_expert_weights(
                layout, part["mlp"]["experts"]
            )
            stages["gather"] += time.time() - t0
        layer = build_layer(config, i, part)
        resid, moe_in = attention_part(layer, x, config)
        stages["forward"] += time.time() - t0
        dense = _to_dtype(_strip_experts(part), cfg.dense_dtype)
        del part
        packed = problem = None
        if layer.is_moe:
            block: MoEBlock = layer.mlp
            problem = build_problem(
                i, block, moe_in.reshape(-1, config.hidden_size), cfg, config, stages, mesh=mesh
            )
            if cfg.budget_scope == "layer":
                t = time.time()
                bits, allocs = allocate_layers([problem], first_budget, "layer", _alloc_kw(cfg))[i]
                bits = distributed.broadcast_from_writer(
                    bits
                )  # one allocation (process 0's) everywhere
                stages["allocation"] += time.time() - t
                t = time.time()
                qe = pack_layer(problem, bits, layout)
                stages["pack"] += time.time() - t
                packed = (qe, bits, allocs, _problem_summary(problem))
                if not keep_problems:
                    problem = (
                        None  # units, weights, calibration copies: not needed past the packing
                    )
                if cfg.sequential:
                    block.experts = qe
            # model scope: layers are only known together; later layers calibrate on the original
            # outputs
            t = time.time()
            x = resid + block(moe_in)
        else:
            t = time.time()
            x = resid + layer.mlp(moe_in)
        stages["forward"] += time.time() - t
        faults.point("layer_computed")
        t = time.time()
        info = {"index": i, "wall_s": t - t0, "stage_s": dict(stages)}
        work.commit_layer(i, dense, np.asarray(x), info, packed, problem if keep_problems else None)
        distributed.barrier(f"layer_{i}_committed")
        stages["commit"] += time.time() - t
        bar.layer_done(i, time.time() - t0, dict(stages))
        layer = block = problem = packed = dense = resid = moe_in = (
            None  # before the next layer is read
        )
        _release_layer_executables()
    bar.close()


def _release_layer_executables() -> None:
    """Drop the compiled dequantization of the layer just finished: its packed segment shapes are
    the
    layer's own (they depend on the allocation), so no later layer reuses it, and jit caches never
    shrink — without this, memory grows by a few MB per layer (measured: ~30 MB per layer of a small
    model, together with the per-shape `jnp.asarray` executables `QuantizedExperts` now avoids)."""
    dequantize_packed.clear_cache()
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


def _recorded_timings(work: WorkDir, config: ModelConfig) -> dict[str, float]:
    """Stage seconds summed over every committed layer, whichever run (resumed or not) did them."""
    timings = dict.fromkeys(STAGES, 0.0)
    timings["tokenize"] = float(work.top_info()["tokenize_s"])
    total = timings["tokenize"]
    for i in range(config.num_hidden_layers):
        info = work.layer_info(i)
        for k, v in info["stage_s"].items():
            timings[k] = timings.get(k, 0.0) + float(v)
        total += float(info["wall_s"])
    timings["quantize_total"] = total
    return timings


def _finished_reports(
    cfg: Any, config: ModelConfig, budgets: list[tuple[float, Path]]
) -> list[dict[str, Any]] | None:
    """The reports of outputs that all exist and were written by this exact run, else None."""
    digest = fingerprint.output_digest(fingerprint.compute(cfg, config), cfg)
    reports = []
    for _, d in budgets:
        try:
            report = json.loads((d / "report.json").read_text())
            timings = json.loads((d / TIMINGS_FILE).read_text())
        except (OSError, ValueError):
            return None
        if report.get("run_fingerprint") != digest:
            return None
        reports.append({**report, **timings})
    return reports


def _model_allocation(
    cfg: Any, config: ModelConfig, budget: float, work: WorkDir
) -> tuple[dict, list[dict[str, Any]], float]:
    """(bits per MoE layer, allocation records, seconds) of a model-scope budget: solved once by
    process 0 over every layer's loss tables (the units stay on disk, memory-mapped) and committed,
    or read back from the work directory."""
    if not work.has_model_allocation(budget):
        t = time.time()
        solution = allocate_layers(
            [work.load_problem(i) for i in config.moe_layers], budget, "model", _alloc_kw(cfg)
        )
        bits = {i: solution[i][0] for i in config.moe_layers}
        records = allocation_records(solution[config.moe_layers[0]][1])
        seconds = time.time() - t
        work.commit_model_allocation(budget, bits, records, seconds)
        return bits, records, seconds
    return work.load_model_allocation(budget)


def _pack_later_budgets(
    cfg: Any, config: ModelConfig, budgets: list[tuple[float, Path]], work: WorkDir
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
    todo = budgets[1:] if cfg.budget_scope == "layer" else budgets
    for b, _ in todo:
        if work.output_report(b) is not None:
            continue
        model_solution = None
        if cfg.budget_scope == "model":
            if distributed.is_writer():
                bits, _, _ = _model_allocation(cfg, config, b, work)
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
            packed = _pack_at_budget(cfg, work, i, b, model_solution, seconds)
            work.commit_budget_layer(b, i, packed, seconds)
            packed = None
            _release_layer_executables()
        distributed.log(
            f"budget {b:.2f}: MoE layers packed by {count} processes ("
            + "; ".join(
                f"process {p}: layers {[i for j, i in enumerate(moe) if j % count == p]}"
                for p in range(count)
            )
            + ")"
        )
    distributed.barrier("later_budgets_packed")


def _write_outputs(
    cfg: Any, config: ModelConfig, budgets: list[tuple[float, Path]], work: WorkDir, overwrite: bool
) -> list[dict[str, Any]]:
    """Write every budget's output from the work directory (process 0); skip outputs already
    written."""
    if not distributed.is_writer():
        return []
    reports = []
    shared: dict = {}  # evaluation tokens and reference model, read once for all budgets
    recorded = None  # read from the layers' records only when an output is still to be written
    for b, out_dir in budgets:
        done = work.output_report(b)
        if done is not None:
            reports.append(done)
            continue
        if recorded is None:
            recorded = _recorded_timings(work, config)
        for stale in [
            *out_dir.parent.glob(f".{out_dir.name}.tmp-*"),
            *out_dir.parent.glob(f".{out_dir.name}.old-*"),
        ]:
            shutil.rmtree(stale, ignore_errors=True)  # `atomic_directory` leftovers of a killed run
        timings = dict(recorded)
        model_solution = None
        if cfg.budget_scope == "model":
            bits, records, seconds = _model_allocation(cfg, config, b, work)
            model_solution = {i: (bits[i], records) for i in config.moe_layers}
            timings["allocation"] += seconds
        from_packed = cfg.budget_scope == "layer" and b == budgets[0][0]
        report = _write_output(
            cfg, config, b, out_dir, work, from_packed, model_solution, timings, overwrite, shared
        )
        faults.point("output_renamed")
        work.mark_output_done(b, report)
        reports.append(report)
    return reports


def _alloc_kw(cfg: Any) -> dict[str, Any]:
    return {
        "allocator": cfg.allocator,
        "milp_max_units": cfg.milp_max_units,
        "time_limit": cfg.milp_time_limit,
    }


def _problem_summary(p: LayerProblem) -> dict[str, Any]:
    return {
        "starved_experts": [int(e) for e in p.stats.starved],
        "tokens_per_expert": np.asarray(p.stats.tokens).tolist(),
        "super_experts": [int(e) for e in p.super_experts],
        "rank": {q: p.rank(q) for q in PROJECTIONS},
        "full_rank_units": {q: p.num_experts * p.rank(q) for q in PROJECTIONS},
        "num_weights": p.num_weights,
    }


def _layer_result(
    cfg: Any, work: WorkDir, i: int, budget: float, from_packed: bool, model_solution, timings: dict
):
    """(experts, bits, allocation records, problem summary) of MoE layer `i` at `budget`, from the
    work dir."""
    if from_packed:
        return work.load_packed(i)
    if work.has_budget_layer(budget, i):  # packed by the process that owns the layer
        qe, bits, allocs, summary, seconds = work.load_budget_layer(budget, i)
        timings["allocation"] += seconds["allocation"]
        timings["pack"] += seconds["pack"]
        return qe, bits, (model_solution[i][1] if model_solution else allocs), summary
    return _pack_at_budget(cfg, work, i, budget, model_solution, timings)


def _pack_at_budget(cfg: Any, work: WorkDir, i: int, budget: float, model_solution, timings: dict):
    """Allocate (unless `model_solution` has the layer's bits) and pack MoE layer `i` from its
    stored
    problem; (experts, bits, allocation records, problem summary), stage seconds added to
    `timings`."""
    problem = work.load_problem(i)
    t = time.time()
    bits, allocs = (model_solution or allocate_layers([problem], budget, "layer", _alloc_kw(cfg)))[
        i
    ]
    timings["allocation"] += time.time() - t
    t = time.time()
    qe = pack_layer(problem, bits)
    timings["pack"] += time.time() - t
    return qe, bits, allocation_records(allocs), _problem_summary(problem)


def _num_params(tree: Any) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def _write_output(
    cfg,
    config: ModelConfig,
    budget: float,
    out_dir: Path,
    work: WorkDir,
    from_packed: bool,
    model_solution,
    timings: dict,
    overwrite: bool,
    shared: dict,
) -> dict:
    """One budget's checkpoint, streamed a layer at a time from the work directory, then its
    report."""
    t_write = time.time()
    expert_bits = expert_weights = dense_params = 0
    layers_meta: dict[int, Any] = {}
    layer_summary: dict[str, Any] = {}
    allocation_time: dict[str, list[float]] = {}
    moe = set(config.moe_layers)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        top = work.load_top()
        dense_params += _num_params(top)
        checkpoint_io.save_top(tmp, top)
        del top
        for i in range(config.num_hidden_layers):
            dense = work.load_dense(i)
            dense_params += _num_params(dense)
            if i not in moe:
                checkpoint_io.save_layer(tmp, i, dense, None, None)
                continue
            qe, bits, allocs, problem = _layer_result(
                cfg, work, i, budget, from_packed, model_solution, timings
            )
            layers_meta[i] = checkpoint_io.save_layer(tmp, i, dense, qe, bits)
            _release_layer_executables()
            faults.point("output_write")
            sb = qe.stored_bits()
            expert_bits += sb
            expert_weights += problem["num_weights"]
            allocation_time[str(i)] = [a["time_s"] for a in allocs]
            layer_summary[str(i)] = {
                **problem,
                "stored_bits": sb,
                "bpw": sb / problem["num_weights"],
                "bits_histogram": bits_histogram(bits, cfg.candidate_bits),
                "kept_components": {
                    q: sum(m.seg_sizes) // qe.num_experts
                    for q, m in zip(PROJECTIONS, qe.meta, strict=False)
                },
                # solver times are run timings: they go to timings.json, not into the compared
                # report
                "allocation": [{k: v for k, v in a.items() if k != "time_s"} for a in allocs],
            }
        src = Path(cfg.model_path)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        dense_bits = dense_params * (16 if cfg.dense_dtype in ("bfloat16", "float16") else 32)
        summary = {
            "budget_bits": budget,
            "effective_bpw_experts": expert_bits / max(expert_weights, 1),
            "effective_bpw_model": (expert_bits + dense_bits) / (dense_params + expert_weights),
            "expert_stored_bits": expert_bits,
            "expert_weights": expert_weights,
        }
        checkpoint_io.write_meta(tmp, config, cfg.to_dict(), layers_meta, summary)
        timings["write"] = time.time() - t_write
        report = _evaluate_into_report(cfg, tmp, budget, summary, layer_summary, timings, shared)
        report["allocation_time_s"] = allocation_time
        report["run_fingerprint"] = fingerprint.output_digest(work.fingerprint(), cfg)
        write_report(tmp, report)
    return report


def evaluation_inputs(cfg: Any) -> tuple[np.ndarray, Any]:
    """(token ids of `cfg.eval_text`, cut to `eval_max_tokens`; the unquantized reference model)."""
    ids = tokenize_text(load_tokenizer(cfg.model_path), read_text(cfg.eval_text))
    return (ids[: int(cfg.eval_max_tokens)] if cfg.eval_max_tokens else ids), load_model(
        cfg.model_path
    )[0]


def _eval_metrics(cfg: Any, model, shared: dict) -> dict[str, Any]:
    """Report metrics of `model` against the unquantized model on `cfg.eval_text`.

    `shared` carries the tokenized text and the reference model between the budgets of one run, so
    they are read once, not once per output.
    """

    if "ids" not in shared:
        shared["ids"], shared["ref"] = evaluation_inputs(cfg)
    res = evaluate_model(
        model,
        shared["ids"],
        cfg.seq_len,
        cfg.seq_len,
        batch_size=cfg.eval_batch_size,
        reference=shared["ref"],
    )
    return {
        "eval_text": str(cfg.eval_text),
        "eval_tokens": int(res["tokens_scored"]),
        "perplexity_fp": float(res["reference_perplexity"]),
        "perplexity_q": float(res["perplexity"]),
        "kl_divergence": float(res["kl_divergence"]),
        "top1_agreement": float(res["top1_agreement"]),
    }


def _evaluate_into_report(
    cfg, qdir: Path, budget, summary, layer_summary, timings, shared: dict
) -> dict:
    report: dict[str, Any] = {
        "method": cfg.method,
        "model": str(cfg.model_path),
        "budget_bits": budget,
        **{k: v for k, v in summary.items() if k != "budget_bits"},
        "layers": layer_summary,
        "starved_experts": {
            i: s["starved_experts"] for i, s in layer_summary.items() if s["starved_experts"]
        },
        "super_experts": {
            i: s["super_experts"] for i, s in layer_summary.items() if s["super_experts"]
        },
        "allocation_gaps": {
            i: [a["gap"] for a in s["allocation"]] for i, s in layer_summary.items()
        },
        "calib_text": str(cfg.calib_text),
        "num_calib_tokens": int(cfg.num_calib_tokens),
    }
    if cfg.eval_text:
        t = time.time()
        report.update(_eval_metrics(cfg, checkpoint_io.load_quantized(qdir)[0], shared))
        timings["evaluate"] = time.time() - t
    report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
    report["time_s"]["total"] = round(
        sum(v for k, v in timings.items() if k in ("quantize_total", "write", "evaluate")), 3
    )
    return report


def print_summary(report: dict) -> str:
    parts = [
        f"{report['budget_bits']:.2f} bpw budget → {report['effective_bpw_experts']:.3f} effective "
        "bpw (experts)"
    ]
    if "kl_divergence" in report:
        parts.append(
            f"ppl {report['perplexity_fp']:.2f} → {report['perplexity_q']:.2f}, KL "
            f"{report['kl_divergence']:.4f}, "
            f"top-1 {100 * report['top1_agreement']:.1f}%"
        )
    parts.append(f"{report['time_s']['total']:.1f} s")
    return " | ".join(parts)


def quantize_baseline(cfg: Any, progress: bool = True) -> list[dict[str, Any]]:
    """RTN / GPTQ / expert-wise / K-quants at each budget, calibrated like BitsMoE, written with the
    same report.

    The checkpoint keeps the dequantized expert weights (float32, exact values of codes × scales) in
    the converted format, so `load_model` and `evaluate` read it directly; its effective bpw counts
    what the method stores (integer codes and their scales: bf16 per group, or the K-quants' integer
    sub-block scales and fp16 factors), not the float32 container.
    """
    import jax as _jax
    from flax import nnx

    budgets = _budget_dirs(cfg)
    for _, d in budgets:
        if d.exists() and not cfg.overwrite:
            raise FileExistsError(f"{d}: output exists (set --config.overwrite=True to replace it)")
    config = model_config(cfg.model_path)
    if (
        cfg.method == "kquant"
    ):  # before any work: a model K-quants cannot store is an error, not a late crash
        check_contractions(config.hidden_size, config.moe_intermediate_size)
    calib = jnp.asarray(
        calibration_tokens(cfg.model_path, cfg.calib_text, cfg.num_calib_tokens, cfg.seq_len)
    )
    reports = []
    shared: dict = {}
    for budget, out_dir in budgets:
        t0 = time.time()
        model, _ = load_model(cfg.model_path)
        info = run_baseline(cfg.method, model, calib, budget, cfg.group_size, cfg.min_tokens)
        qtime = time.time() - t0
        pure = _jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        layers = pure.pop("layers")
        expert_weights = (
            3
            * config.num_experts
            * config.hidden_size
            * config.moe_intermediate_size
            * len(config.moe_layers)
        )
        with atomic_directory(out_dir, overwrite=cfg.overwrite) as tmp:
            save_tree(tmp / "params" / "top", _to_dtype(pure, cfg.dense_dtype))
            dense_params = 0
            for i in range(config.num_hidden_layers):
                part = layers[i]
                dense = _to_dtype(_strip_experts(part), cfg.dense_dtype)
                dense_params += int(sum(np.size(a) for a in _jax.tree.leaves(dense)))
                if "mlp" in part and "experts" in part["mlp"]:
                    dense.setdefault("mlp", {})["experts"] = _to_dtype(
                        part["mlp"]["experts"], "float32"
                    )
                save_tree(tmp / "params" / f"layer_{i:03d}", dense)
            src = Path(cfg.model_path)
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copy(src / f, tmp / f)
            top_params = int(sum(np.size(a) for a in _jax.tree.leaves(pure)))
            dense_bits = (top_params + dense_params) * (
                16 if cfg.dense_dtype in ("bfloat16", "float16") else 32
            )
            bpw = float(info["effective_bpw_experts"])
            summary = {
                "budget_bits": budget,
                "effective_bpw_experts": bpw,
                "effective_bpw_model": (bpw * expert_weights + dense_bits)
                / (expert_weights + top_params + dense_params),
                "expert_weights": expert_weights,
            }
            meta = {
                "format": FORMAT_CONVERTED,
                "version": 1,
                "dtype": "float32",
                "config": json.loads(config.to_json()),
                "quantization": {
                    "method": cfg.method,
                    **{k: v for k, v in info.items()},
                    **summary,
                },
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
            report: dict[str, Any] = {
                "method": cfg.method,
                "model": str(cfg.model_path),
                **summary,
                "setting": info["setting"],
                "layers": {},
                "starved_experts": info.get("starved_experts", {}),
                "super_experts": {},
                "allocation_gaps": {},
                "calib_text": str(cfg.calib_text),
                "num_calib_tokens": int(cfg.num_calib_tokens),
            }
            timings = {"quantize_total": qtime}
            if cfg.eval_text:
                t = time.time()
                stored, _ = load_model(
                    tmp
                )  # evaluate what was written (dense weights at dense_dtype)
                report.update(_eval_metrics(cfg, stored, shared))
                timings["evaluate"] = time.time() - t
            report["time_s"] = {k: round(v, 3) for k, v in timings.items()}
            report["time_s"]["total"] = round(sum(timings.values()), 3)
            write_report(tmp, report)
        reports.append(report)
    return reports
