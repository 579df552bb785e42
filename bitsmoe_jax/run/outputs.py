"""Writing a run's outputs: the quantized checkpoint of each budget, streamed from the work
directory, and the helpers every method's writer shares (dense params, tokenizer files)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bitsmoe_jax.io.checkpoint import META_FILE, atomic_directory
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.layer_problem import (
    bits_histogram,
)
from bitsmoe_jax.models.assemble import leaf_dtype
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run import faults, fingerprint, model_scope
from bitsmoe_jax.run.budgets import (
    dense_expert_fn,
    layer_result,
    model_allocation,
    release_layer_executables,
)
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.run.evaluation import bitsmoe_report, finish_report
from bitsmoe_jax.run.report import TIMINGS_FILE, write_report
from bitsmoe_jax.run.workdir import WorkDir
from bitsmoe_jax.serve import quantized_checkpoint as checkpoint_io
from bitsmoe_jax.serve.read_bytes import layer_read_bytes, per_token_bytes
from conversion.convert import TOKENIZER_FILES, np_dtype

# stages whose seconds the reports record (timings.json), in the order they run
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


def strip_experts(layer_params: dict) -> dict:
    dense = {k: v for k, v in layer_params.items() if k != "mlp"}
    if "mlp" in layer_params:
        dense["mlp"] = {k: v for k, v in layer_params["mlp"].items() if k != "experts"}
    return dense


def to_dtype(tree: Any, dtype: str) -> Any:
    """A dense param tree as stored in outputs: `dtype`, but `FLOAT32_PARAMS` kept float32."""
    dt = np_dtype(dtype)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: np.asarray(a).astype(leaf_dtype(path, dt)), tree
    )


# What an output directory of this tool holds (`write_output`), and what a multi-budget run's
# OUTPUT_DIR holds besides its bpw_X.XX/ directories (`report.write_pareto`).
OUTPUT_ENTRIES = frozenset(
    {"params", checkpoint_io.QUANT_META, META_FILE, "report.json", "report.md", TIMINGS_FILE}
    | set(TOKENIZER_FILES)
)
MULTI_BUDGET_ENTRIES = frozenset({"pareto.json", "pareto.md", "pareto.png"})
# a budget's directory, or the temporary / replaced one `atomic_directory` keeps beside it while
# writing (left behind by a killed run, which a rerun resumes)
_BUDGET_DIR = re.compile(r"bpw_\d+\.\d\d|\.bpw_\d+\.\d\d\.(tmp|old)-[0-9a-f]{8}")


def check_output_location(output_dir: str | Path, budget_dirs: list[Path]) -> None:
    """Refuse, before any work, output directories that hold files this tool did not write: they
    are never written into, replaced or deleted, with or without `overwrite` (an `output_dir`
    pointed at a home or data directory by mistake must not lose it). An empty directory is
    fine; one of ours (its report.json or quantized.json beside nothing else) is what `overwrite`
    replaces."""
    out = Path(output_dir)
    places = [(d, OUTPUT_ENTRIES, False) for d in budget_dirs]
    if len(budget_dirs) > 1:
        places.append((out, MULTI_BUDGET_ENTRIES, True))
    for d, allowed, multi in places:
        if not d.is_dir():
            if d.exists():
                raise FileExistsError(
                    f"{d}: exists and is not a directory; choose another output_dir"
                )
            continue
        entries = sorted(p.name for p in d.iterdir())
        foreign = [
            e for e in entries if e not in allowed and not (multi and _BUDGET_DIR.fullmatch(e))
        ]
        ours = multi or not entries or {"report.json", checkpoint_io.QUANT_META} & set(entries)
        if foreign or not ours:
            shown = ", ".join((foreign or entries)[:5]) + (
                " …" if len(foreign or entries) > 5 else ""
            )
            raise FileExistsError(
                f"{d}: holds files bitsmoe-jax did not write ({shown}); it never writes into, "
                "replaces or deletes such a directory, even with overwrite=True — choose another "
                "output_dir"
            )


def copy_tokenizer_files(model_path: str | Path, out: Path) -> None:
    """The source model's tokenizer files, so that `evaluate` and `generate` work on the output."""
    src = Path(model_path)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)


def stored_bits(tree: Any) -> int:
    """Bits of every array of a (dense) param tree as stored: the dense dtype, and float32 for
    the parameters kept exact (`FLOAT32_PARAMS`, the sigmoid routers' selection bias)."""
    return int(sum(np.asarray(a).nbytes * 8 for a in jax.tree.leaves(tree)))


def num_params(tree: Any) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def recorded_timings(work: WorkDir, config: ModelConfig) -> dict[str, float]:
    """Stage seconds summed over every committed layer, whichever run (resumed or not) did them."""
    timings = dict.fromkeys(STAGES, 0.0)
    timings["tokenize"] = float(work.top_info()["tokenize_s"])
    total = timings["tokenize"]
    for i in range(config.num_hidden_layers):
        info = work.layer_info(i)
        for k, v in info["stage_s"].items():
            timings[k] = timings.get(k, 0.0) + float(v)
        total += float(info["wall_s"])
    tables = work.root / model_scope.TABLES
    if tables.is_dir():  # a whole-model budget's first pass: its own stage, all of it
        timings["tables_pass"] = sum(
            float(WorkDir(tables).layer_info(i)["wall_s"]) for i in range(config.num_hidden_layers)
        )
        total += timings["tables_pass"]
    timings["quantize_total"] = total
    return timings


def finished_reports(
    run: RunConfig, config: ModelConfig, budgets: list[tuple[float, Path]]
) -> list[dict[str, Any]] | None:
    """The reports of outputs that all exist and were written by this exact run, else None."""
    digest = fingerprint.output_digest(fingerprint.compute(run, config), run)
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


def write_outputs(
    run: RunConfig,
    config: ModelConfig,
    budgets: list[tuple[float, Path]],
    work: WorkDir,
    overwrite: bool,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Write every budget's output from the work directory (process 0); skip outputs already
    written. With `progress`, a line says what each of these steps (allocating and packing the
    later budgets, writing, evaluating) is doing before it starts."""
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
            recorded = recorded_timings(work, config)
        for stale in [
            *out_dir.parent.glob(f".{out_dir.name}.tmp-*"),
            *out_dir.parent.glob(f".{out_dir.name}.old-*"),
        ]:
            shutil.rmtree(stale, ignore_errors=True)  # `atomic_directory` leftovers of a killed run
        timings = dict(recorded)
        timings["shared"] = recorded["quantize_total"]  # the layers' work: every budget's
        model_solution = None
        from_packed = b == budgets[0][0]  # packed by the layer pass, whatever the scope
        if progress:
            distributed.log(
                f"budget {b:.2f}: writing {out_dir}"
                + (
                    ""
                    if from_packed
                    else " (allocating and packing every MoE layer at this budget)"
                )
                + " …"
            )
        if run.budget_scope == "model" and not from_packed:
            bits, records, seconds = model_allocation(run, config, b, work)
            model_solution = {i: (bits[i], records) for i in config.moe_layers}
            timings["allocation"] += seconds
        elif work.has_model_allocation(b):  # the first budget's, solved between the two passes
            timings["allocation"] += work.load_model_allocation(b)[2]
        report = _write_output(
            run,
            config,
            b,
            out_dir,
            work,
            from_packed,
            model_solution,
            timings,
            overwrite,
            shared,
            distributed.log if progress else None,
        )
        faults.point("output_renamed")
        work.mark_output_done(b, report)
        reports.append(report)
    return reports


def write_output(
    run: RunConfig,
    out_dir: Path,
    overwrite: bool,
    shared: dict,
    write_body: Callable[[Path], WrittenBody],
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One output directory of any method, written atomically (`io.checkpoint.atomic_directory`):
    the method's params, metadata and report fields (`write_body(tmp)`), the tokenizer files, the
    evaluation of what was written (`evaluation.finish_report`) and `report.json` / `report.md`.
    The one writer of BitsMoE and the baselines, so every output has the same layout and report."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        body = write_body(tmp)
        copy_tokenizer_files(run.tokenizer or run.model_path, tmp)
        finish_report(run, body.report, body.load_written, body.timings, shared, log)
        body.report.update(body.trailing)
        write_report(tmp, body.report)
    return body.report


@dataclasses.dataclass
class WrittenBody:
    """What a method's writer leaves for `write_output`: its report so far, its stage timings, how
    to load the written model back for evaluation, and report fields that follow the evaluation."""

    report: dict[str, Any]
    timings: dict[str, float]
    load_written: Callable[[], Any]
    trailing: dict[str, Any] = dataclasses.field(default_factory=dict)


def _write_output(
    run,
    config: ModelConfig,
    budget: float,
    out_dir: Path,
    work: WorkDir,
    from_packed: bool,
    model_solution,
    timings: dict,
    overwrite: bool,
    shared: dict,
    log: Callable[[str], None] | None,
) -> dict:
    """One budget's checkpoint, streamed a layer at a time from the work directory, then its
    report."""

    def body(tmp: Path) -> WrittenBody:
        t_write = time.time()
        expert_bits = expert_weights = dense_params = dense_stored = 0
        layers_meta: dict[int, Any] = {}
        layer_summary: dict[str, Any] = {}
        allocation_time: dict[str, list[float]] = {}
        decode_total: dict[str, dict[str, float]] = {}
        moe = set(config.moe_layers)
        top = work.load_top()
        dense_params += num_params(top)
        dense_stored += stored_bits(top)
        checkpoint_io.save_top(tmp, top)
        del top
        for i in range(config.num_hidden_layers):
            dense = work.load_dense(i)
            dense_params += num_params(dense)
            dense_stored += stored_bits(dense)
            if i not in moe:
                checkpoint_io.save_layer(tmp, i, dense, None, None)
                continue
            fn = dense_expert_fn(config, dense)
            qe, bits, allocs, problem = layer_result(
                run, work, i, budget, from_packed, model_solution, timings, fn
            )
            layers_meta[i] = checkpoint_io.save_layer(tmp, i, dense, qe, bits)
            release_layer_executables()
            faults.point("output_write")
            sb = qe.stored_bits()
            decode = per_token_bytes(
                *layer_read_bytes(qe.stored_arrays(), qe.tree_meta()),
                problem["num_weights"] // qe.num_experts,
                config.num_experts_per_tok,
            )
            for b, row in decode.items():  # the MoE layers' sum: what a decoded token reads
                for name, v in row.items():
                    if name != "distinct_experts":
                        decode_total.setdefault(b, {}).setdefault(name, 0.0)
                        decode_total[b][name] += v
            expert_bits += sb
            expert_weights += problem["num_weights"]
            allocation_time[str(i)] = [a["time_s"] for a in allocs]
            layer_summary[str(i)] = {
                **problem,
                "stored_bits": sb,
                "bpw": sb / problem["num_weights"],
                "bits_histogram": bits_histogram(bits, run.params.candidate_bits),
                "decode_bytes_per_token": decode,
                "kept_components": {
                    q: sum(m.seg_sizes) // qe.num_experts
                    for q, m in zip(PROJECTIONS, qe.meta, strict=False)
                },
                # solver times are run timings: they go to timings.json, not into the compared
                # report
                "allocation": [{k: v for k, v in a.items() if k != "time_s"} for a in allocs],
            }
        dense = dense_stored
        summary = {
            "budget_bits": budget,
            # what the budget counts: "stored" bits, or "decode" (read by a batch-1 step)
            "budget_counts": run.params.budget_counts,
            "effective_bpw_experts": expert_bits / max(expert_weights, 1),
            "effective_bpw_model": (expert_bits + dense) / (dense_params + expert_weights),
            "expert_stored_bits": expert_bits,
            "expert_weights": expert_weights,
            # bytes the MoE layers read per decoded token (ours from the written arrays; the
            # expert-wise layouts at these dims), by batch size: serve/read_bytes.py
            "decode_bytes_per_token": decode_total,
        }
        checkpoint_io.write_meta(tmp, config, run.to_dict(), layers_meta, summary)
        timings["write"] = time.time() - t_write
        return WrittenBody(
            bitsmoe_report(run, budget, summary, layer_summary),
            timings,
            lambda: checkpoint_io.load_quantized(tmp)[0],
            {
                "allocation_time_s": allocation_time,
                "run_fingerprint": fingerprint.output_digest(work.fingerprint(), run),
            },
        )

    return write_output(run, out_dir, overwrite, shared, body, log)
