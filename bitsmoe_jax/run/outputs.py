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
from bitsmoe_jax.method import sharded
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
from bitsmoe_jax.serve.quantized_checkpoint import ExpertShard, LayerHead
from bitsmoe_jax.serve.quantized_experts import packed_from_tree
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
    """Write every budget's output from the work directory; skip outputs already written. With
    `progress`, a line says what each of these steps (allocating and packing the later budgets,
    writing, evaluating) is doing before it starts.

    Process 0 writes and evaluates; in a run of several processes every process calls this: the
    first budget's expert-parallel layers (each process's experts packed into its own shard) are
    written by the processes that packed them, each its own groups of experts
    (`serve.quantized_checkpoint`), into process 0's temporary output directory — so no process
    reads another's packed experts."""
    groups = GroupWriters.of(run, config)
    if not distributed.is_writer():
        out = distributed.text_from_writer("output_dir", "")
        if out:  # process 0 is writing the first budget and has expert-parallel layers
            for i in config.moe_layers:
                if (index := work.packed_shards(i)) is not None:
                    write_shard_groups(Path(out), work, i, index, groups)
                    faults.point("output_groups")
            distributed.barrier("output_groups_written")
        return []
    reports = []
    shared: dict = {}  # evaluation tokens and reference model, read once for all budgets
    recorded = None  # read from the layers' records only when an output is still to be written
    for b, out_dir in budgets:
        from_packed = b == budgets[0][0]  # packed by the layer pass, whatever the scope
        done = work.output_report(b)
        if done is not None:
            if from_packed:
                distributed.text_from_writer("output_dir", "")  # nothing for the others to write
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
            groups,
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
    groups: GroupWriters,
    log: Callable[[str], None] | None,
) -> dict:
    """One budget's checkpoint, streamed a layer at a time from the work directory, then its
    report. The first budget's expert-parallel layers: this process writes their heads and its
    own groups; the other processes theirs (`write_outputs`)."""
    moe = set(config.moe_layers)
    shards = {i: work.packed_shards(i) for i in moe} if from_packed else {}
    helped = from_packed and any(v is not None for v in shards.values())

    def body(tmp: Path) -> WrittenBody:
        if from_packed:
            distributed.text_from_writer("output_dir", str(tmp) if helped else "")
        t_write = time.time()
        expert_bits = expert_weights = dense_params = dense_stored = 0
        layers_meta: dict[int, Any] = {}
        layer_summary: dict[str, Any] = {}
        allocation_time: dict[str, list[float]] = {}
        decode_total: dict[str, dict[str, float]] = {}
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
            if (index := shards.get(i)) is not None:  # expert-parallel: each its own groups
                bits, allocs, problem = work.load_packed_record(i)
                head = sharded_head(work, i, index)
                layers_meta[i] = checkpoint_io.save_layer_head(
                    tmp, i, dense, head, bits, groups.size
                )
                write_shard_groups(tmp, work, i, index, groups)
            else:
                fn = dense_expert_fn(config, dense)
                qe, bits, allocs, problem = layer_result(
                    run, work, i, budget, from_packed, model_solution, timings, fn
                )
                head = LayerHead.of(qe)
                layers_meta[i] = checkpoint_io.save_layer_head(
                    tmp, i, dense, head, bits, groups.size
                )
                checkpoint_io.save_expert_groups(
                    tmp, i, qe.num_experts, groups.size, [ExpertShard.whole(qe)]
                )
                qe = None
                release_layer_executables()
            faults.point("output_write")
            sb = head.stored_bits()
            decode = per_token_bytes(
                *layer_read_bytes(head.stored_arrays(), layers_meta[i]),
                problem["num_weights"] // head.num_experts,
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
                    q: sum(head.factors[q].seg_sizes) // head.num_experts for q in PROJECTIONS
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
        if helped:  # every process's groups written before the checkpoint is read or renamed
            distributed.barrier("output_groups_written")
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


@dataclasses.dataclass(frozen=True)
class GroupWriters:
    """How this run writes a layer's packed experts: `size` experts per group, and the process
    that holds each group's experts (`owner[k]`, from the run's mesh) — the one that writes the
    group of an expert-parallel layer."""

    size: int
    owner: tuple[int, ...]

    @classmethod
    def of(cls, run: RunConfig, config: ModelConfig) -> GroupWriters:
        layout = sharded.expert_layout(distributed.make_mesh(run.mesh_shape), config.num_experts)
        ranges = layout.process_ranges()
        size = checkpoint_io.expert_group_size(config.num_experts, [lo for lo, _, _ in ranges])
        spans = checkpoint_io.expert_groups(config.num_experts, size)
        owner = tuple(next(q for lo, hi, q in ranges if lo <= g < hi) for g, _ in spans)
        return cls(size, owner)

    def mine(self) -> list[int]:
        return [k for k, q in enumerate(self.owner) if q == jax.process_index()]


def sharded_head(work: WorkDir, i: int, index: list[tuple[int, int, str]]) -> LayerHead:
    """The head of expert-parallel layer `i` from its shards' permutations and metadata (only
    these are read: the packed rows stay where they are)."""
    heads, bases = [], {}
    for k, (_, _, name) in enumerate(index):
        arrays, meta = work.load_shard(i, name)
        if k == 0:
            bases = {
                p: {n: np.array(v) for n, v in arrays.get("basis", {}).get(p, {}).items()}
                for p in PROJECTIONS
            }
        heads.append(({p: np.array(arrays["factors"][p]["perm"]) for p in PROJECTIONS}, meta))
    return LayerHead.of_shards(bases, heads)


def write_shard_groups(
    out: Path, work: WorkDir, i: int, index: list[tuple[int, int, str]], groups: GroupWriters
) -> None:
    """This process's groups of expert-parallel layer `i`, from the shards (memory-mapped) that
    hold their experts — its own, when the layer was packed on this run's mesh."""
    mine = groups.mine()
    if not mine:
        return
    e_count = index[-1][0] + index[-1][1]
    spans = checkpoint_io.expert_groups(e_count, groups.size)
    lo, hi = spans[mine[0]][0], spans[mine[-1]][1]
    parts = [
        ExpertShard(first, count, packed_from_tree(*work.load_shard(i, name)))
        for first, count, name in index
        if first < hi and lo < first + count
    ]
    checkpoint_io.save_expert_groups(out, i, e_count, groups.size, parts, mine)
