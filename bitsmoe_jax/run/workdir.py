"""The resumable work directory of a quantization run: one atomic commit per finished layer.

Layout (default `<output_dir>.partial`, config `work_dir`; removed after a successful run):

    fingerprint.json        what the run depends on (`fingerprint.py`); a mismatch refuses to resume
    top/                    top-level params at `dense_dtype`                   (committed first)
    layer_003/              one per finished decoder layer, committed in order:
        dense.{bin,json}    the layer's non-expert params at `dense_dtype`
        x.{bin,json}        calibration activations after the layer (only the newest layer keeps it)
        packed.{bin,json}   MoE: the first budget's packed experts, bits and allocation
        problem.{bin,json}  MoE, when later budgets need it: the `LayerProblem`
        units/              ... and its units and loss weights, per expert (`DiskUnits`)
        info.json           stage timings (never copied into a compared output file)
    scope_tables/           budget_scope="model": the tables pass (`model_scope.py`), laid out
                            alike, each layer's problem without its units (loss tables only)
    bpw_2.00_model_allocation/  budget_scope="model": the bits of every MoE layer at a budget
    outputs/bpw_2.50.json   a budget whose output directory is complete (its report)

A commit writes a hidden `.tmp-*` sibling, fsyncs every file and the directory, renames it into
place and fsyncs the parent: after `kill -9` at any instant a layer directory is either complete or
absent, and a stale `.tmp-*` is deleted on the next start. Layers are committed in order, so the
committed layers are always a prefix and the run resumes at the first missing one.

Everything the final output is built from (dense params, packed layers, problems) is read back from
here by interrupted and uninterrupted runs alike, which is what makes their outputs byte-identical.

Stored problems omit `stats.s_gate` / `stats.s_up` (the [E, F, r] float64 sums already folded into
the loss weights; no stage keeps them): a loaded problem carries them as empty [E, F, 0] arrays.
A layer being worked on spills its units to `.scratch-layer_NNN-pP/` (removed once the layer is
committed; a killed run's are removed when it resumes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.method.allocate import Allocation
from bitsmoe_jax.method.calibrate import ExpertStats
from bitsmoe_jax.method.coefficients import PROJECTIONS, Coefficients
from bitsmoe_jax.method.error_feedback import CalibrationInputs
from bitsmoe_jax.method.layer_problem import LayerProblem
from bitsmoe_jax.method.unit_store import DiskUnits, NoUnits, UnitStore
from bitsmoe_jax.run import faults
from bitsmoe_jax.run.config_schema import RunConfig
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts, merge_expert_shards

FINGERPRINT_FILE = "fingerprint.json"
TOP = "top"
UNITS = "units"  # a layer's problem: its units and loss weights (`unit_store.DiskUnits`)


class ResumeError(ValueError):
    """The work directory cannot be resumed (a fingerprint mismatch, or not a work directory)."""


def default_work_dir(run: RunConfig) -> Path:
    """`run.work_dir`, or `<output_dir>.partial` beside the output."""
    if run.work_dir:
        return Path(run.work_dir)
    out = Path(run.output_dir).absolute()
    return out.parent / f"{out.name}.partial"


def layer_name(i: int) -> str:
    return f"layer_{i:03d}"


def budget_name(budget: float) -> str:
    return f"bpw_{float(budget):.2f}"


class WorkDir:
    """A run's work directory. `writer=False` (processes other than 0) never writes, only reads."""

    def __init__(self, root: Path, writer: bool = True):
        self.root = Path(root).absolute()
        self.writer = writer
        self.created_now = False

    # ------------------------------------------------------------------------------ opening
    def open(
        self,
        fingerprint: dict[str, Any],
        resume: bool,
        describe_mismatch: Callable[[dict, dict], list[str]],
    ) -> bool:
        """Create the directory, or check that an existing one belongs to this run; True if
        resuming."""
        fp_path = self.root / FINGERPRINT_FILE
        if self.root.exists() and not resume:
            if self.writer:
                shutil.rmtree(self.root)
        elif self.root.exists():
            if not fp_path.is_file():
                raise ResumeError(
                    f"{self.root} exists but is not a quantization work directory (no "
                    f"{FINGERPRINT_FILE}); "
                    "delete it or set --config.work_dir to another path"
                )
            old = json.loads(fp_path.read_text())
            changes = describe_mismatch(old, fingerprint)
            if changes:
                raise ResumeError(
                    f"cannot resume from {self.root}: it was started with a different "
                    + "; ".join(changes)
                    + ". To start fresh, rerun with --config.resume=False (the work directory is "
                    "then replaced) "
                    f"or delete {self.root}."
                )
            if self.writer:  # half-written commits, and units spilled by a killed run's layer
                for stale in [*self.root.glob(".tmp-*"), *self.root.glob(".scratch-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
            return True
        self.clear_tombstones()
        if self.writer:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.root.parent / f".{self.root.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            arrayfile.write_text_durable(
                tmp / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1, sort_keys=True)
            )
            arrayfile.fsync_path(tmp)
            os.rename(tmp, self.root)
            arrayfile.fsync_path(self.root.parent)
            self.created_now = True
        return False

    def clear_tombstones(self) -> None:
        """Delete what a cleanup killed after its final rename left (`.<name>.deleted-*`)."""
        if self.writer:
            for stale in self.root.parent.glob(f".{self.root.name}.deleted-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def fingerprint(self) -> dict[str, Any]:
        return json.loads((self.root / FINGERPRINT_FILE).read_text())

    def remove(self) -> None:
        """Delete the work directory so that a kill at any instant leaves something a rerun handles.

        Layers and the rest go first while the fingerprint and the finished-output records stay (a
        rerun then sees every output done and only finishes the cleanup); the emptied directory is
        then renamed away in one atomic step and deleted under its tombstone name.
        """
        if not self.writer or not self.root.exists():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.name in (FINGERPRINT_FILE, "outputs"):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            faults.point("cleanup")
        tomb = self.root.parent / f".{self.root.name}.deleted-{uuid.uuid4().hex[:8]}"
        os.rename(self.root, tomb)
        arrayfile.fsync_path(self.root.parent)
        faults.point("tombstone")
        shutil.rmtree(tomb, ignore_errors=True)

    def all_outputs_done(self, budgets: list[float]) -> bool:
        return all(self.output_report(b) is not None for b in budgets)

    # ------------------------------------------------------------------------------ commits
    def _commit(self, name: str, fill: Callable[[Path], None], any_process: bool = False) -> None:
        """Write a directory with `fill(tmp)` and make it appear as `name` atomically and durably.

        Only process 0 commits, except `any_process` commits (each process's own layers of a later
        budget, under names no other process writes; they reach process 0 where the work directory
        is on a shared filesystem, and process 0 recomputes whatever it does not find)."""
        if not (self.writer or any_process):
            return
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        fill(tmp)
        arrayfile.fsync_path(tmp)
        faults.point("commit_before_rename")
        os.rename(tmp, self.root / name)
        arrayfile.fsync_path(self.root)

    def committed_layers(self) -> list[int]:
        return sorted(
            int(p.name[6:]) for p in self.root.glob("layer_[0-9][0-9][0-9]") if p.is_dir()
        )

    def next_layer(self) -> int:
        """The first layer not committed (commits happen in order, so they form a prefix)."""
        done = set(self.committed_layers())
        i = 0
        while i in done:
            i += 1
        return i

    def has_top(self) -> bool:
        return (self.root / TOP).is_dir()

    def commit_top(self, top: dict, info: dict[str, Any]) -> None:
        def fill(d: Path) -> None:
            arrayfile.save(d, "params", top)
            arrayfile.write_text_durable(d / "info.json", json.dumps(info, indent=1))

        self._commit(TOP, fill)

    def commit_layer(
        self,
        i: int,
        dense: dict,
        x: np.ndarray,
        info: dict[str, Any],
        packed: tuple[QuantizedExperts, dict[str, np.ndarray], list[Allocation], dict[str, Any]]
        | None = None,
        problem: LayerProblem | None = None,
    ) -> None:
        """Commit everything layer `i` produced; then drop the previous layer's activations.

        `packed` may hold no experts (None in its first slot): every process then staged its own
        experts' shard (`stage_shard`) before this commit, and the shards are moved into the
        layer, to be joined when it is read (`load_packed`)."""

        def fill(d: Path) -> None:
            arrayfile.save(d, "dense", dense)
            arrayfile.save(d, "x", {"x": np.asarray(x)})
            if packed is not None:
                _save_packed(d, packed)
                if packed[0] is None:
                    # this run's processes' shards only: a killed earlier attempt with more
                    # processes may have left others (a process without real experts has none)
                    staged = [
                        shard
                        for k in range(jax.process_count())
                        if (shard := self._shard_dir(i, k)).is_dir()
                    ]
                    if not staged:
                        raise FileNotFoundError(
                            f"{self.root}: layer {i}'s expert shards are missing"
                        )
                    for k, shard in enumerate(staged):
                        for suffix in ("bin", "json"):
                            os.rename(shard / f"shard.{suffix}", d / f"shard_{k:04d}.{suffix}")
                        shard.rmdir()
            if problem is not None:
                tree, extra = problem_to_tree(problem)
                arrayfile.save(d, "problem", tree, extra)
                if isinstance(problem.store, DiskUnits):
                    problem.store.link_into(d / UNITS)
                elif not isinstance(problem.store, NoUnits):
                    raise TypeError(
                        "a committed problem keeps its units on disk (DiskUnits) or none (NoUnits)"
                    )
            arrayfile.write_text_durable(d / "info.json", json.dumps(info, indent=1))

        self._commit(layer_name(i), fill)
        faults.point("layer_committed")
        if self.writer and i > 0:
            prev = self.root / layer_name(i - 1)
            for f in ("x.bin", "x.json"):
                (prev / f).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ reads
    def stage_shard(self, i: int, experts: QuantizedExperts, first: int) -> None:
        """Write this process's packed experts of layer `i` (experts `first`, `first` + 1, ...;
        `pack_layer(own_only=True)`) where process 0's commit of the layer will pick them up:
        durable before the barrier that precedes the commit. A leftover of a killed run is
        replaced."""
        d = self._shard_dir(i, jax.process_index())
        shutil.rmtree(d, ignore_errors=True)
        tmp = self.root / f".tmp-shard-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        arrays, meta = experts.to_tree()
        arrayfile.save(tmp, "shard", arrays, {"meta": meta, "first": int(first)})
        arrayfile.fsync_path(tmp)
        os.rename(tmp, d)
        arrayfile.fsync_path(self.root)

    def _shard_dir(self, i: int, process: int) -> Path:
        return self.root / f".shard-{layer_name(i)}-p{process:05d}"

    def load_top(self) -> dict:
        return arrayfile.load(self.root / TOP, "params")[0]

    def top_info(self) -> dict[str, Any]:
        return json.loads((self.root / TOP / "info.json").read_text())

    def load_dense(self, i: int) -> dict:
        return arrayfile.load(self.root / layer_name(i), "dense")[0]

    def load_x(self, i: int) -> np.ndarray:
        return np.array(arrayfile.load(self.root / layer_name(i), "x")[0]["x"])

    def layer_info(self, i: int) -> dict[str, Any]:
        return json.loads((self.root / layer_name(i) / "info.json").read_text())

    def has_packed(self, i: int) -> bool:
        return (self.root / layer_name(i) / "packed.json").is_file()

    def load_packed(
        self, i: int
    ) -> tuple[QuantizedExperts, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
        """(experts, bits per unit, allocation records, problem summary) of the first budget."""
        return _load_packed(self.root / layer_name(i))[:4]

    def packed_shards(self, i: int) -> list[tuple[int, int, str]] | None:
        """(first expert, count, name) of each process's shard of layer `i`'s packed experts (an
        expert-parallel layer pass), in expert order; None if the layer's experts are whole."""
        d = self.root / layer_name(i)
        tree, extra = arrayfile.load(d, "packed", mmap=True)
        return _shard_index(d, len(tree["bits"]["gate"])) if extra.get("sharded") else None

    def load_shard(self, i: int, name: str) -> tuple[dict, dict[str, Any]]:
        """One shard of `packed_shards` (arrays memory-mapped: only what is sliced is read) and its
        `QuantizedExperts.tree_meta()`."""
        arrays, extra = arrayfile.load(self.root / layer_name(i), name, mmap=True)
        return arrays, extra["meta"]

    def load_packed_record(
        self, i: int
    ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
        """(bits per unit, allocation records, problem summary) of the first budget's layer `i`,
        without its experts."""
        tree, extra = arrayfile.load(self.root / layer_name(i), "packed")
        return tree["bits"], extra["allocations"], extra["summary"]

    # ------------------------------------------------------------- model-scope allocations
    def has_model_allocation(self, budget: float) -> bool:
        return (self.root / f"{budget_name(budget)}_model_allocation" / "bits.json").is_file()

    def commit_model_allocation(
        self,
        budget: float,
        bits: dict[int, dict[str, np.ndarray]],
        records: list[dict[str, Any]],
        seconds: float,
    ) -> None:
        """One `budget_scope="model"` allocation (bits of every MoE layer), so that every process
        and
        every rerun packs the same bits (a time-limited MILP need not find the same incumbent
        twice)."""

        def fill(d: Path) -> None:
            arrayfile.save(
                d,
                "bits",
                {str(i): b for i, b in bits.items()},
                {"allocations": records, "seconds": seconds},
            )

        self._commit(f"{budget_name(budget)}_model_allocation", fill)

    def load_model_allocation(
        self, budget: float
    ) -> tuple[dict[int, dict[str, np.ndarray]], list[dict[str, Any]], float]:
        tree, extra = arrayfile.load(self.root / f"{budget_name(budget)}_model_allocation", "bits")
        return (
            {int(i): {q: np.array(v) for q, v in b.items()} for i, b in tree.items()},
            extra["allocations"],
            float(extra["seconds"]),
        )

    # ------------------------------------------------------------- later budgets, spread over
    # processes
    def has_budget_layer(self, budget: float, i: int) -> bool:
        return (self.root / budget_layer_name(budget, i) / "packed.json").is_file()

    def commit_budget_layer(
        self,
        budget: float,
        i: int,
        packed: tuple[
            QuantizedExperts, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]
        ],
        seconds: dict[str, float],
    ) -> None:
        """Layer `i` packed at a later budget (by whichever process owns it), with its stage
        seconds."""

        self._commit(
            budget_layer_name(budget, i),
            lambda d: _save_packed(d, packed, seconds=seconds),
            any_process=True,
        )

    def load_budget_layer(self, budget: float, i: int):
        """(experts, bits, allocation records, problem summary, stage seconds) of a committed budget
        layer."""
        *result, extra = _load_packed(self.root / budget_layer_name(budget, i))
        return (*result, extra["seconds"])

    def has_problem(self, i: int) -> bool:
        return (self.root / layer_name(i) / "problem.json").is_file()

    def load_problem(self, i: int) -> LayerProblem:
        """The stored problem; its units and weights are read a chunk at a time when packed."""
        d = self.root / layer_name(i)
        tree, extra = arrayfile.load(d, "problem", mmap=True)
        store = (
            DiskUnits(d / UNITS)
            if extra.get("units_kept", True)
            else NoUnits({q: tree["loss"][q].shape[1] for q in PROJECTIONS})
        )
        return problem_from_tree(tree, extra, store)

    def scratch(self, i: int, tag: str = "") -> Path:
        """Where layer `i`'s units are spilled while it is worked on (this process's own; a
        leftover of a killed run is removed when the layer starts again). `tag`: one of several
        stores of the layer (its problems at several basis precisions)."""
        d = self.root / f".scratch-{layer_name(i)}-p{jax.process_index()}{'-' + tag if tag else ''}"
        shutil.rmtree(d, ignore_errors=True)
        return d

    # ------------------------------------------------------------------------------ outputs
    def output_report(self, budget: float) -> dict[str, Any] | None:
        p = self.root / "outputs" / f"{budget_name(budget)}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def mark_output_done(self, budget: float, report: dict[str, Any]) -> None:
        if not self.writer:
            return
        d = self.root / "outputs"
        d.mkdir(exist_ok=True)
        tmp = d / f".tmp-{uuid.uuid4().hex[:8]}.json"
        arrayfile.write_text_durable(tmp, json.dumps(report, indent=1, default=_json_default))
        os.rename(tmp, d / f"{budget_name(budget)}.json")
        arrayfile.fsync_path(d)


def budget_layer_name(budget: float, i: int) -> str:
    return f"{budget_name(budget)}_{layer_name(i)}"


def _save_packed(
    d: Path,
    packed: tuple[QuantizedExperts, dict[str, np.ndarray], list, dict[str, Any]],
    **more: Any,
) -> None:
    """A packed layer (experts, bits, allocations, problem summary) as `packed.bin/.json` in `d`."""
    qe, bits, allocs, summary = packed
    tree: dict[str, Any] = {"bits": bits}
    extra = {"allocations": allocation_records(allocs), "summary": summary, **more}
    if qe is not None:
        tree["experts_q"], extra["meta"] = qe.to_tree()
    else:  # the experts are the processes' shards, moved in beside this file (`commit_layer`)
        extra["sharded"] = True
    arrayfile.save(d, "packed", tree, extra)


def _shard_index(d: Path, experts: int) -> list[tuple[int, int, str]]:
    """(first expert, count, file stem) of each expert shard of the sharded packed layer in `d`, in
    expert order — checked to join: consecutive experts from 0 to the layer's count `experts`, none
    twice."""
    index = []
    for f in sorted(d.glob("shard_*.json")):
        e = json.loads(f.read_text())["extra"]
        index.append((int(e["first"]), int(e["meta"]["num_experts"]), f.stem))
    if not index:
        raise ValueError(f"{d}: a sharded packed layer without its shards")
    index.sort()
    start = 0
    for first, count, _ in index:  # consecutive experts from 0, none twice or missing
        if first != start:
            raise ValueError(
                f"{d}: expert shards do not join (one starts at expert {first}, the experts "
                f"before it end at {start})"
            )
        start += count
    if start != experts:
        raise ValueError(f"{d}: expert shards hold {start} experts, the layer has {experts}")
    return index


def _load_packed(
    d: Path,
) -> tuple[
    QuantizedExperts, dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any], dict[str, Any]
]:
    """What `_save_packed` wrote: (experts, bits, allocation records, problem summary, the whole
    extra)."""
    tree, extra = arrayfile.load(d, "packed")
    if extra.get("sharded"):
        index = _shard_index(d, len(tree["bits"]["gate"]))
        shards = [arrayfile.load(d, stem) for _, _, stem in index]
        experts = merge_expert_shards(
            [QuantizedExperts.from_tree(arrays, e["meta"]) for arrays, e in shards]
        )
    else:
        experts = QuantizedExperts.from_tree(tree["experts_q"], extra["meta"])
    return (
        experts,
        tree["bits"],
        extra["allocations"],
        extra["summary"],
        extra,
    )


def _json_default(o: Any) -> Any:
    return o.item() if hasattr(o, "item") else str(o)


def _alloc_json(a: Allocation | dict[str, Any]) -> dict[str, Any]:
    if isinstance(a, dict):
        return a
    return {
        "solver": a.solver,
        "objective": float(a.objective),
        "lower_bound": float(a.lower_bound),
        "gap": float(a.gap),
        "time_s": float(a.time_s),
    }


def allocation_records(allocs: list[Allocation | dict[str, Any]]) -> list[dict[str, Any]]:
    """Allocation results as JSON records (solver, objective, lower bound, gap, time)."""
    return [_alloc_json(a) for a in allocs]


# ------------------------------------------------------------------------------ problems
_PROBLEM_SCALARS = (
    "index",
    "num_experts",
    "hidden",
    "inter",
    "basis_bits",
    "budget_counts",
    "top_k",
    "super_experts",
    "super_bits",
    "group_size",
)


def problem_to_tree(p: LayerProblem) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, JSON) of a LayerProblem; the inverse of `problem_from_tree`."""
    tree = {
        "loss": p.coeffs.loss,
        "cost": p.coeffs.cost,
        "bases": {q: p.bases[q] for q in PROJECTIONS if p.bases[q]},
        "stats": {"c_down": p.stats.c_down, "mass": p.stats.mass, "tokens": p.stats.tokens},
    }
    if p.coeffs.kappa is not None:
        tree["kappa"] = p.coeffs.kappa
    calib = getattr(p, "calib", None)
    if calib is not None:  # rounding="gptq": later budgets pack with the same error feedback
        tree["calib"] = {"x": calib.x, "expert_idx": calib.expert_idx, "expert_w": calib.expert_w}
    extra = {
        **{k: getattr(p, k) for k in _PROBLEM_SCALARS},
        "candidates": list(p.coeffs.candidates),
        "mode": p.coeffs.mode,
        "starved": list(p.stats.starved),
        "min_tokens": int(calib.min_tokens) if calib is not None else 0,
        "stats_fields": [f.name for f in dataclasses.fields(ExpertStats)],
        # False: loss tables only (the tables pass of a whole-model budget, `model_scope.py`)
        "units_kept": not isinstance(p.store, NoUnits),
    }
    if p.basis_choice is not None:
        extra["basis_choice"] = dict(p.basis_choice)
    extra["super_experts"] = [int(e) for e in extra["super_experts"]]
    return tree, extra


def problem_from_tree(
    tree: dict[str, Any], extra: dict[str, Any], store: UnitStore
) -> LayerProblem:
    e, f = tree["stats"]["c_down"].shape
    stats = ExpertStats(
        s_gate=np.zeros((e, f, 0)),
        s_up=np.zeros((e, f, 0)),
        c_down=tree["stats"]["c_down"],
        mass=tree["stats"]["mass"],
        tokens=tree["stats"]["tokens"],
        starved=[int(s) for s in extra["starved"]],
    )
    coeffs = Coefficients(
        loss=dict(tree["loss"]),
        cost=tree["cost"],
        candidates=tuple(int(c) for c in extra["candidates"]),
        mode=extra["mode"],
        kappa=dict(tree["kappa"]) if "kappa" in tree else None,
    )
    bases = {q: dict(tree.get("bases", {}).get(q, {})) for q in PROJECTIONS}
    optional: dict[str, Any] = {}
    if "calib" in tree:
        optional["calib"] = CalibrationInputs(**tree["calib"], min_tokens=int(extra["min_tokens"]))
    if "basis_choice" in extra:
        optional["basis_choice"] = {str(k): float(v) for k, v in extra["basis_choice"].items()}
    return LayerProblem(
        store=store,
        coeffs=coeffs,
        bases=bases,
        stats=stats,
        **optional,
        **{k: extra[k] for k in _PROBLEM_SCALARS},
    )
