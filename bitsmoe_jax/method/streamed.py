"""One MoE layer quantized a chunk of experts at a time: memory set by the chunk, not the layer.

    bases:    for each projection, every chunk's Gram matrices folded into one order-fixed tree
              (`sharded.GramAccumulator`) → eigendecomposition → quantized basis
    problem:  for each chunk: routing statistics → factors → loss weights → coefficients L(e,k,b);
              the factors and weights go to a `UnitStore` (disk), the coefficients stay (small)
    packing:  after the allocation, for each chunk: error-feedback rounding → codes → packed rows;
              the packed rows of all chunks are joined into the layer's `PackedMatrix`es

A chunk is `chunk` experts of every device's block of the mesh (`sharded.Round`); an expert's
weights are read from its `ExpertSource` when a stage needs them and dropped after. Every
per-expert result is computed by the same per-expert program whatever the chunk, and the only sums
over experts (the Gram matrices) keep their one pairwise tree, so the output is byte-identical for
every chunk size and every mesh — and to the whole-layer functions of `layer_problem`,
`calibrate` and `coefficients`, which stay as the readable reference.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.calibrate import ExpertStats
from bitsmoe_jax.method.coefficients import (
    PROJECTIONS,
    Coefficients,
    basis_pinv,
    down_row_norms,
    expert_loss_weights,
    expert_weight_scale,
    fit_factors,
    sampled_loss,
    unit_norms,
)
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.error_feedback import CalibrationInputs, basis_inputs, feedback_layer
from bitsmoe_jax.method.expert_scale_tuning import (
    ScaleTuning,
    TuningStats,
    down_basis_gram,
    layer_fit_sizes,
    tune_round,
)
from bitsmoe_jax.method.expert_source import ExpertSource
from bitsmoe_jax.method.heap import release_freed_memory
from bitsmoe_jax.method.layer_problem import (
    LayerProblem,
    bases_from_grams,
    basis_whitening,
    dequantized_basis,
    outlier_experts,
    projection_vectors,
    quantized_basis,
)
from bitsmoe_jax.method.packing import (
    PackedMatrix,
    PackedRows,
    assemble_packed,
    dequantize_bucket,
    pack_rows,
    quantize_units,
)
from bitsmoe_jax.method.quantizers import (
    kappa_from_sample,
    sample_indices,
    stored_bits,
)
from bitsmoe_jax.method.shape_buckets import geometric_bucket
from bitsmoe_jax.method.sharded import ExpertLayout, Round
from bitsmoe_jax.method.unit_store import DiskUnits, MemoryUnits, NoUnits
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.models.moe import (
    PLAIN,
    SWIGLU,
    ExpertFn,
    GluActivation,
    MoEBlock,
    RoutingPlan,
    block_expert_fn,
    down_bias_term,
    make_routing_plan,
)
from bitsmoe_jax.parallel.distributed import broadcast_from

SAMPLED_UNITS = 1024  # units measured for κ_b in coefficient_mode="sampled"


def _shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    d, f = config.hidden_size, config.moe_intermediate_size
    return {"gate": (d, f), "up": (d, f), "down": (f, d)}


def _layout(mesh: jax.sharding.Mesh | None, num_experts: int) -> ExpertLayout:
    return sharded.expert_layout(
        mesh if mesh is not None else sharded.single_device_mesh(), num_experts
    )


def streamed_bases(
    source: ExpertSource,
    layout: ExpertLayout,
    rounds: Sequence[Round],
    params: MethodConfig,
    config: ModelConfig,
    x: np.ndarray,
    timings: dict,
    vectors: dict[str, np.ndarray] | None = None,
) -> tuple[dict, dict]:
    """`layer_problem.make_bases` over a streamed layer: each projection's Gram matrix is summed
    round by round, reading only that projection of this process's experts of the round.

    Several processes split the eigendecompositions (`basis_owners`): the projections go in waves
    of one per process; each wave's Gram sums are reduced over every process, each process keeps
    the one it owns and decomposes it while the others decompose theirs, and each projection's
    vectors then reach every process bit for bit from its owner. The bases are the same bytes as
    one process computing all three (the same program on the same sum); each process runs one
    (three processes or more) or at most two (two processes) of the three eigendecompositions —
    at hidden 7168 the most expensive step of the stage — where every process used to run all
    three.

    `vectors` caches the float bases across calls on one layer (bases of several precisions
    quantize the same vectors): filled when empty, read instead of the Gram sums when not."""
    if params.basis == "none":
        return bases_from_grams({}, config.hidden_size, params.rank, params.basis_bits, "none")
    shapes = _shapes(config)
    whitening = basis_whitening(params.basis, x)
    vectors = {} if vectors is None else vectors
    waves = basis_owners([p for p in PROJECTIONS if p not in vectors], layout)
    for wave in waves:
        mine: dict[str, np.ndarray] = {}
        for p, owner in wave:
            acc = sharded.GramAccumulator(layout, p == "down")
            for rnd in rounds:
                release_freed_memory()
                t = time.time()
                local = layout.round_local(rnd)
                mats = dict(zip(local, source.read(local, (p,))[p], strict=True))
                timings["read"] += time.time() - t
                acc.add_round(rnd, mats.__getitem__, shapes[p])
                del mats
            gram = acc.result()  # a reduction over every process: each one calls it
            del acc
            if owner == jax.process_index():
                mine[p] = gram
            del gram
        # This process's basis of the wave before the next Grams: one D×D Gram per process of the
        # wave alive at a time (two while the owner sums the wave's next projection).
        for p in list(mine):
            mine[p] = projection_vectors(p, mine.pop(p), params.rank, whitening)
        for p, owner in wave:
            if not layout.spans_processes:  # this process's mesh: it computed every projection
                vectors[p] = mine[p]
                continue
            shape = (config.hidden_size, params.basis_rank(config.hidden_size))
            vectors[p] = broadcast_from(owner, mine.get(p), shape, np.float32)
    stored, deq = {}, {}
    for p in PROJECTIONS:
        stored[p], deq[p] = quantized_basis(vectors[p], params.basis_bits)
    return stored, deq


def basis_owners(projections: Sequence[str], layout: ExpertLayout) -> list[list[tuple[str, int]]]:
    """Waves of (projection, process that eigendecomposes it): one projection per process of the
    layout's mesh a wave, in projection order; one process (or a mesh of one process's devices)
    gets every projection, one per wave — the order of a run without processes."""
    procs = sorted({d.process_index for d in layout.mesh.devices.flat})
    n = len(procs)
    return [
        [(p, procs[i % n]) for i, p in enumerate(projections[w : w + n], start=w)]
        for w in range(0, len(projections), n)
    ]


class _Routing:
    """The layer's routing of the calibration tokens, and what every chunk needs of all experts:
    the routed masses (after the starved-expert fallback), token counts and mass-floor scales."""

    def __init__(self, block: MoEBlock, x: jax.Array, params: MethodConfig, num_experts: int):
        # x_in: what the routed experts see (x itself, but score · x for Llama 4)
        self.x_in, logits, w, idx = block.route_tokens(x)
        self.unit_weight = block.config.router_scales_input
        self.plan = plan = make_routing_plan(idx, w, num_experts)
        self.sizes = np.asarray(plan.group_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.token = np.asarray(plan.token)
        self.weight = np.asarray(plan.weight, np.float32)
        self.idx = np.asarray(idx)
        self.logits, self.w = logits, w
        mass = sharded.routed_masses(self.weight, self.offsets)
        self.starved = [e for e in range(num_experts) if self.sizes[e] < params.min_tokens]
        routed_mean = mass[mass > 0].mean() if (mass > 0).any() else 1.0
        for e in self.starved:
            mass[e] = mass[e] if mass[e] > 0 else 1e-6 * routed_mean
        self.mass = mass
        self.scale, self.per = expert_weight_scale(
            mass, self.sizes.astype(np.int64), params.expert_mass_floor, params.loss_weighting
        )
        self._probs = self._topk_sum = None

    def as_if_routed(self, e: int) -> np.ndarray:
        """A starved expert's weight for every token had it been in the top-k (`calibrate`).
        Llama 4 weights every output by 1 (its scores scale the inputs; a starved expert's
        statistics then use the inputs as the chosen experts saw them)."""
        if self.unit_weight:
            return np.ones(len(self.idx), np.float64)
        if self._probs is None:
            self._probs = np.asarray(
                jax.nn.softmax(self.logits.astype(jnp.float32), axis=-1), np.float64
            )
            self._topk_sum = np.take_along_axis(self._probs, self.idx, axis=1).sum(1)
        in_topk = (self.idx == e).any(axis=1)
        return self._probs[:, e] / (self._topk_sum + np.where(in_topk, 0.0, self._probs[:, e]))


def _chunk_stats(
    layout: ExpertLayout,
    rnd: Round,
    routing: _Routing,
    x: np.ndarray,
    weights: dict[str, np.ndarray],
    local: list[int],
    deq: dict[str, np.ndarray],
    shape: tuple[int, int],
    fn: ExpertFn = PLAIN,
) -> dict[int, tuple[np.ndarray, ...]]:
    """[s_gate, s_up, c_down] of this process's experts of a round (`calibrate`; float32 sums as
    the per-expert program returns them, exact in float64 where the fallback rescales them)."""
    st = sharded.routed_stats_round(
        layout,
        rnd,
        x,
        routing.token,
        routing.weight,
        routing.offsets,
        {p: dict(zip(local, weights[p], strict=True)) for p in ("gate", "up")},
        shape,
        deq["gate"],
        deq["up"],
        fn,
    )
    starved = [e for e in local if e in routing.starved]
    if starved:
        pos = [local.index(e) for e in starved]
        fg, fu, fd, fmass = sharded.all_token_stats(
            x,
            np.stack([routing.as_if_routed(e) for e in starved]),
            weights["gate"][pos],
            weights["up"][pos],
            deq["gate"],
            deq["up"],
            fn,
            starved,
        )
        for i, e in enumerate(starved):
            scale = routing.mass[e] / max(float(fmass[i]), 1e-30)
            st[e] = (scale * fg[i], scale * fu[i], scale * fd[i], routing.mass[e])
    return {e: list(st[e][:3]) for e in local}


def build_problem(
    index: int,
    block: MoEBlock,
    source: ExpertSource,
    x: jax.Array,
    params: MethodConfig,
    config: ModelConfig,
    timings: dict,
    mesh: jax.sharding.Mesh | None = None,
    chunk: int | None = None,
    store_dir: Path | None = None,
    gather_units: bool = True,
    vectors: dict[str, np.ndarray] | None = None,
    keep: str = "all",
    bases: dict[str, dict[str, np.ndarray]] | None = None,
) -> LayerProblem:
    """Bases, statistics, units, weights and coefficients of one MoE layer (x: MoE input [N, D]),
    `chunk` experts per device at a time (default: a device's whole block).

    The units and loss weights go to a `DiskUnits` store at `store_dir` (default: held in memory);
    the returned problem reads them back a chunk at a time. Several processes: each stores its own
    experts' units, and with `gather_units` every expert's (a problem packed again later, at
    another budget or by one process, needs them all). `vectors`: the float bases, shared by the
    problems of one layer at several basis precisions (`streamed_bases`). `keep`: "all"; "tables"
    (the units are dropped once their loss tables are made: a `NoUnits` store, allocatable, not
    packable); "units" (no loss tables, zeros in their place: the layer's bits are already chosen,
    by the whole-model allocation of `run/model_scope.py`). `bases`: stored bases to build on
    instead of computing them (that allocation's, so that its bits mean the same units).
    """
    e_count = config.num_experts
    layout = _layout(mesh, e_count)
    rounds = layout.rounds(chunk or layout.per_device)
    routing = _Routing(block, x, params, e_count)
    x = routing.x_in  # from here on: the experts' input
    x_np = np.asarray(x, np.float32)
    t = time.time()
    if bases is None:
        stored, deq = streamed_bases(source, layout, rounds, params, config, x_np, timings, vectors)
    else:
        stored = {p: {k: np.asarray(v) for k, v in bases[p].items()} for p in PROJECTIONS}
        eye = np.eye(config.hidden_size, dtype=np.float32)  # basis="none": nothing stored
        deq = {p: eye if (d := dequantized_basis(stored[p])) is None else d for p in PROJECTIONS}
    pinv = {p: basis_pinv(deq[p]) for p in PROJECTIONS}
    timings["basis"] += time.time() - t
    fn = block_expert_fn(block)
    calib = (
        CalibrationInputs(
            x_np, routing.idx.astype(np.int32), np.asarray(routing.w, np.float32), params.min_tokens
        )
        if params.rounding == "gptq"
        else None
    )
    f = config.moe_intermediate_size
    ranks = {p: int(deq[p].shape[1]) for p in PROJECTIONS}
    shapes = {p: (e_count, ranks[p], f) for p in PROJECTIONS}
    if keep not in ("all", "tables", "units"):
        raise ValueError(f"keep={keep!r}: choose 'all', 'tables' or 'units'")
    tables = keep != "units"
    store = (
        NoUnits(ranks)
        if keep == "tables"
        else DiskUnits(store_dir, shapes)
        if store_dir is not None
        else MemoryUnits(
            {p: np.zeros(s, np.float32) for p, s in shapes.items()},
            {p: np.zeros(s, np.float32) for p, s in shapes.items()},
        )
    )
    cands = tuple(int(b) for b in params.candidate_bits)
    exact = params.coefficient_mode == "exact"
    if params.coefficient_mode not in ("exact", "sampled"):
        raise ValueError(
            f"loss coefficient mode {params.coefficient_mode!r}: choose 'exact' or 'sampled'"
        )
    loss = {p: np.zeros((e_count, ranks[p], len(cands)), np.float64) for p in PROJECTIONS}
    norms = {p: np.zeros((e_count, ranks[p]), np.float32) for p in PROJECTIONS}
    sample = {p: _Sample(e_count * ranks[p], ranks[p], f, params.seed) for p in PROJECTIONS}
    c_down = np.zeros((e_count, f), np.float64)
    multi = layout.spans_processes
    for rnd in layout.rounds_with_experts(chunk or layout.per_device):
        release_freed_memory()  # the previous chunk's weights, statistics and factors
        t = time.time()
        local = layout.round_local(rnd)
        w = source.read(local)
        timings["read"] += time.time() - t
        t = time.time()
        stats = _chunk_stats(layout, rnd, routing, x_np, w, local, deq, _shapes(config)["gate"], fn)
        timings["calibration"] += time.time() - t
        dn = down_row_norms(w["down"])
        for e in local:
            c_down[e] = stats[e][2]
        # One projection at a time, each expert's matrix dropped once its factors are fitted and
        # each statistic once folded into its weights: the live set is a projection's, not three.
        for p, which in (("gate", 0), ("up", 1), ("down", 2)):
            t = time.time()
            mats = w.pop(p)
            units = fit_factors(
                deq[p], np.swapaxes(mats, 1, 2) if p == "down" else mats, pinv=pinv[p]
            )
            del mats
            timings["basis"] += time.time() - t
            t = time.time()
            weights = np.empty_like(units)
            for j, e in enumerate(local):
                stat = stats[e][which]
                if routing.per is not None:
                    stat = stat * routing.per[e]
                weights[j] = expert_loss_weights(p, stat, dn[j], routing.scale[e])
                stats[e][which] = None
            mine_u = dict(zip(local, units, strict=True))
            mine_w = dict(zip(local, weights, strict=True))
            if exact and tables:
                errs = sharded.unit_errors_round(
                    layout, rnd, mine_u, mine_w, (ranks[p], f), cands, params.group_size
                )
                for e, v in errs.items():
                    loss[p][e] = v.astype(np.float64)
            if tables and not exact:  # this process's experts; shared after the last chunk
                for e in local:
                    sample[p].take(e, mine_u[e], mine_w[e])
                    norms[p][e] = unit_norms(mine_u[e], mine_w[e])
            # a stored problem packed again later (any budget, any process) holds every expert's
            # units
            if multi and gather_units and keep != "tables":
                mine_u = sharded.round_gather(
                    layout,
                    rnd,
                    sharded.round_array(layout, rnd, mine_u.__getitem__, (ranks[p], f), np.float32),
                )
                mine_w = sharded.round_gather(
                    layout,
                    rnd,
                    sharded.round_array(layout, rnd, mine_w.__getitem__, (ranks[p], f), np.float32),
                )
            for e in mine_u:
                store.put(p, e, mine_u[e], mine_w[e])
            del units, weights, mine_u, mine_w
            timings["coefficients"] += time.time() - t
        del stats, w
    kappa = None
    if tables and not exact:
        if multi:
            for p in PROJECTIONS:
                _share_owned(layout, norms[p], sample[p])
        kappa = {p: sample[p].kappa(cands, params.group_size) for p in PROJECTIONS}
        for p in PROJECTIONS:
            loss[p] = sampled_loss(norms[p], kappa[p])
    coeffs = Coefficients(
        loss=loss,
        cost=np.array([stored_bits(f, b, params.group_size) for b in cands], np.int64),
        candidates=cands,
        mode=params.coefficient_mode,
        kappa=kappa,
    )
    if params.super_experts == "auto":
        supers = detect_super_experts(
            x, routing.plan, source, chunk, params.super_expert_threshold, fn
        )
    else:
        supers = [
            int(e)
            for e in (
                params.super_experts.get(str(index), [])
                if isinstance(params.super_experts, dict)
                else params.super_experts
            )
        ]
    stats = ExpertStats(
        s_gate=np.zeros((e_count, f, 0)),
        s_up=np.zeros((e_count, f, 0)),
        c_down=c_down,
        mass=routing.mass,
        tokens=routing.sizes.astype(np.int64),
        starved=routing.starved,
    )
    return LayerProblem(
        index=index,
        num_experts=e_count,
        hidden=config.hidden_size,
        inter=f,
        store=store,
        coeffs=coeffs,
        bases=stored,
        basis_bits=params.basis_bits,
        stats=stats,
        super_experts=supers,
        super_bits=params.super_expert_bits,
        group_size=params.group_size,
        calib=calib,
        budget_counts=params.budget_counts,
        top_k=config.num_experts_per_tok,
    )


def _share_owned(layout: ExpertLayout, norms: np.ndarray, sample: _Sample) -> None:
    """Every process's experts' unit norms [E, r] and κ sample rows, filled in on every process
    from their owners (each process computed its own experts' only: the units themselves never
    travel). A copy of the owner's bytes, so the tables equal one process's."""
    rank = norms.shape[1]
    for lo, hi, owner in layout.process_ranges():
        mine = owner == jax.process_index()
        norms[lo:hi] = broadcast_from(
            owner, norms[lo:hi] if mine else None, (hi - lo, rank), np.float32
        )
        a, b = np.searchsorted(sample.idx, [lo * rank, hi * rank])
        if b > a:
            for rows in (sample.x, sample.w):
                shape = (int(b - a), rows.shape[1])
                rows[a:b] = broadcast_from(owner, rows[a:b] if mine else None, shape, np.float32)


class _Sample:
    """The units `kappa_estimates` would draw from the whole layer, collected chunk by chunk."""

    def __init__(self, total: int, rank: int, f: int, seed: int):
        k = min(SAMPLED_UNITS, total)
        self.idx = sample_indices(total, k, seed)
        self.rank = rank
        self.x = np.zeros((k, f), np.float32)
        self.w = np.zeros((k, f), np.float32)

    def take(self, e: int, units: np.ndarray, weights: np.ndarray) -> None:
        lo, hi = np.searchsorted(self.idx, [e * self.rank, (e + 1) * self.rank])
        rows = self.idx[lo:hi] - e * self.rank
        self.x[lo:hi] = units[rows]
        self.w[lo:hi] = weights[rows]

    def kappa(self, cands: Sequence[int], group_size: int) -> np.ndarray:
        return kappa_from_sample(jnp.asarray(self.x), jnp.asarray(self.w), cands, group_size)


# ------------------------------------------------------------------------------------ packing
def round_and_pack(
    problem: LayerProblem,
    bits: dict[str, np.ndarray],
    layout: ExpertLayout | None = None,
    chunk: int | None = None,
    fn: ExpertFn = PLAIN,
    tuning: ScaleTuning | None = None,
    stats: TuningStats | None = None,
    own_only: bool = False,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, PackedMatrix]]:
    """(stored bases, packed factors) of a layer's units rounded and packed at the allocated bits,
    all-zero components dropped, `chunk` experts per device at a time
    (`serve.quantized_experts.pack_layer` makes the served block).

    `tuning`: each expert's factor group scales are then fitted to its output error with the
    codes fixed (`expert_scale_tuning`; needs the calibration inputs; `stats` sums what it did).

    Several processes: each rounds (error feedback, scale search, codes) the experts of its own
    devices, from its own units. With `own_only` the packed factors are this process's experts'
    only (`layout.local_experts()`, in order: a shard that `merge_expert_shards` joins with the
    others' into the layer's); otherwise an all-gather of each round's codes and scales (not of
    any weight or unit, except 16-bit ones) gives every process the packed layer. The scale fit's
    per-expert records are gathered either way (a few numbers per expert, for the report).
    """
    e_count = problem.num_experts
    if layout is None:
        layout = _layout(None, e_count)
    multi = layout.spans_processes
    gather = multi and not own_only
    keep = {p: problem.kept(p, bits[p]) for p in PROJECTIONS}
    has16 = {p: bool((bits[p] == 16).any()) for p in PROJECTIONS}
    deq = (
        {p: dequantized_basis(problem.bases[p]) for p in PROJECTIONS}
        if problem.calib is not None
        else None
    )
    # the tokens through the gate/up bases: once a layer, for the error feedback and the tuning
    z = basis_inputs(problem.calib.x, deq) if deq is not None else None
    tune = tuning is not None and deq is not None
    if tune:
        down_gram = down_basis_gram(deq["down"], problem.rank("down"))
        fit_sizes = layer_fit_sizes(tuning, problem.calib, e_count)
        stats = stats if stats is not None else TuningStats()
    parts: dict[str, dict[int, PackedRows]] = {p: {} for p in PROJECTIONS}
    tuning_records: dict[int, np.ndarray] = {}
    for rnd in layout.rounds_with_experts(chunk or layout.per_device):
        release_freed_memory()  # the previous chunk's units, rounding and codes
        local = layout.round_local(rnd)
        loaded = {p: problem.store.load(p, local) for p in PROJECTIONS}
        rounded = {p: (loaded[p][0], None) for p in PROJECTIONS}
        if deq is not None:
            # Error feedback over all r components (dropped ones fold into the kept), then keep.
            rounded = feedback_layer(
                {p: loaded[p][0] for p in PROJECTIONS},
                {p: loaded[p][1] for p in PROJECTIONS},
                deq,
                problem.calib,
                {p: bits[p][local] for p in PROJECTIONS},
                problem.group_size,
                ids=local,
                fn=fn,
                z=z,
            )
        # the unquantized units are the tuning's reference; otherwise they go now
        reference = {p: loaded[p][0] for p in PROJECTIONS} if tune else None
        # the rounded values replace the units; each projection's arrays go once it is packed
        loaded = {p: (None, loaded[p][1]) for p in PROJECTIONS}
        rows: dict[str, dict[str, np.ndarray]] = {}
        for p in PROJECTIONS:
            full, scales = rounded.pop(p)
            k = keep[p]
            units = full[:, k]
            f = units.shape[-1]
            bpu = bits[p][local][:, k]
            del full
            codes, qscales = quantize_units(
                units.reshape(-1, f),
                bpu.reshape(-1),
                problem.group_size,
                loaded.pop(p)[1][:, k].reshape(-1, f),
                None if scales is None else scales[:, k].reshape(-1, scales.shape[-1]),
            )
            rows[p] = {
                "codes": codes.reshape(len(local), k.size, f),
                "scales": qscales.reshape(len(local), k.size, -1),
            }
            if has16[p] or not gather:  # 16-bit units are stored as their values
                rows[p]["units"] = units
            del units, codes, qscales
        if tune:  # the round's scales fitted in place; its records gathered with the codes
            rows["gate"]["tuning"] = tune_round(
                tuning, z, down_gram, problem.calib, local, reference, keep, bits, rows,
                problem.group_size, fn, stats, fit_sizes,
            )  # fmt: skip
            del reference
        for p in PROJECTIONS:
            mine = {key: dict(zip(local, v, strict=True)) for key, v in rows[p].items()}
            if multi:
                mine = {
                    key: sharded.round_gather(
                        layout,
                        rnd,
                        sharded.round_array(
                            layout,
                            rnd,
                            m.__getitem__,
                            rows[p][key].shape[1:],
                            rows[p][key].dtype,
                        ),
                    )
                    if gather or key == "tuning"
                    else m
                    for key, m in mine.items()
                }
            if "tuning" in mine:
                tuning_records.update(mine.pop("tuning"))
            for e in mine["codes"]:
                parts[p][e] = pack_rows(
                    mine["units"][e] if "units" in mine else None,
                    bits[p][e][keep[p]],
                    mine["codes"][e],
                    mine["scales"][e],
                    problem.group_size,
                )
            del rows[p], mine
    for e in sorted(tuning_records):
        stats.add(tuning_records[e])
    packed = {
        p: assemble_packed(
            [parts[p][e] for e in sorted(parts[p])], problem.inter, problem.group_size, consume=True
        )
        for p in PROJECTIONS
    }
    # kept components only; at 4 or 6 bits the codes are packed into bit-plane words here
    bases = {
        p: basis_lib.stored_basis_arrays(
            problem.bases[p]["q"][:, keep[p]], problem.bases[p].get("scale"), problem.basis_bits
        )
        if problem.bases[p]
        else {}
        for p in PROJECTIONS
    }
    return bases, packed


# ------------------------------------------------------------------------------------ forward
def _tile(m: int) -> int:
    """The row tile `tiled_grouped_matmul` uses for m rows (its default 128, capped)."""
    return max(1, min(128, 1 << (max(m, 1) - 1).bit_length()))


def _expert_rows(
    zg: np.ndarray,
    zu: np.ndarray,
    token: np.ndarray,
    sizes: np.ndarray,
    e0: int,
    e1: int,
    mats: Mapping[str, Any],
    fn: ExpertFn = PLAIN,
) -> np.ndarray:
    """The SwiGLU outputs of the sorted rows of experts [e0, e1) — row j's inputs are row
    `token[j]` of `zg` (to the gate) and `zu` (to the up matrices) — exactly as one grouped SwiGLU
    over the whole layer computes them: the rows are cut from the same row tiles (aligned to the
    same tile boundaries, other experts' rows zeroed and folded into the first / last group), so
    every tile product is the one the whole-layer call makes. Only these experts' rows are
    gathered: the sorted inputs of a whole top-k layer are k times the tokens'."""
    m = int(sizes.sum())
    tile = _tile(m)
    offs = np.concatenate([[0], np.cumsum(sizes)])
    lo, hi = int(offs[e0]), int(offs[e1])
    row0 = (lo // tile) * tile
    row1 = max(-(-hi // tile) * tile, row0 + tile)
    # Whole tiles of zero rows past row1 (folded into the last group, like the other experts'
    # rows of the edge tiles) make the row count one of a few sizes; the tiles holding these
    # experts' rows, and so every product they take part in, are unchanged.
    padded = tile * geometric_bucket((row1 - row0) // tile)
    g = sizes[e0:e1].astype(np.int32).copy()
    g[0] += lo - row0
    g[-1] += padded - (hi - row0)
    gs = jnp.asarray(g)
    rows = token[lo:hi]

    def cut(zs: np.ndarray) -> jax.Array:  # host gathers: no program per chunk shape
        sub = np.zeros((padded, zs.shape[1]), zs.dtype)
        sub[lo - row0 : hi - row0] = zs[rows]
        return jnp.asarray(sub)

    a = grouped_matmul(cut(zg), jnp.asarray(mats["gate"]), gs)
    if fn.plain:
        h = jax.nn.silu(a) * grouped_matmul(cut(zu), jnp.asarray(mats["up"]), gs)
    else:  # GPT-OSS: gate/up biases of each row's expert, then the clamped activation
        u = grouped_matmul(cut(zu), jnp.asarray(mats["up"]), gs)
        if fn.bias is not None:
            ex = np.repeat(np.arange(e0, e1), g)
            a = a + jnp.asarray(fn.rows("gate", ex)).astype(a.dtype)
            u = u + jnp.asarray(fn.rows("up", ex)).astype(u.dtype)
        h = fn.act(a, u)
    y = grouped_matmul(h, jnp.asarray(mats["down"]), gs)
    return np.asarray(y)[lo - row0 : hi - row0]


def _sorted_rows(
    zg: jax.Array,
    zu: jax.Array,
    token: np.ndarray,
    sizes: np.ndarray,
    chunk: int | None,
    read: Callable[[range], dict[str, np.ndarray]],
    width: int,
    fn: ExpertFn = PLAIN,
) -> np.ndarray:
    """[M, width] outputs of every expert's sorted rows (row j: token `token[j]` of `zg` / `zu`),
    `chunk` experts (`read`) at a time (before any down bias)."""
    out = np.zeros((len(token), width), np.float32)
    for lo, hi, _, rows in _chunk_rows(zg, zu, token, sizes, chunk, read, fn):
        out[lo:hi] = rows
    return out


@dataclasses.dataclass(frozen=True)
class Owners:
    """Who computes which experts' rows of a forward shared by several processes: `ranges` are
    (first expert, end, process) in expert order (`ExpertLayout.process_ranges`); the rows are
    `width` wide, of `dtype`."""

    ranges: tuple[tuple[int, int, int], ...]
    width: int
    dtype: Any


def _chunk_rows(zg, zu, token, sizes, chunk, read, fn: ExpertFn = PLAIN, owners=None):
    """(first row, end row, experts, their SwiGLU outputs `_expert_rows`) of each chunk of
    `chunk` experts that has rows, in expert order — the loop `_sorted_rows` and `_combined_rows`
    share.

    `owners` (an `Owners`; several processes, each holding only its experts): a chunk's rows are
    computed by the process that owns its experts (`read` is asked for those only) and broadcast
    to the others, chunk by chunk in expert order — activations, never weights — so that every
    process adds every row in the same order as one process computing all of them."""
    offs = np.concatenate([[0], np.cumsum(sizes)])
    step = chunk or len(sizes)
    zg, zu = np.asarray(zg), (np.asarray(zg) if zu is zg else np.asarray(zu))  # gathered on host
    me = jax.process_index()
    for lo, hi, src in owners.ranges if owners is not None else ((0, len(sizes), None),):
        for e0 in range(lo, hi, step):
            e1 = min(e0 + step, hi)
            if offs[e1] <= offs[e0]:
                continue
            release_freed_memory()  # the previous chunk's arrays: freed, not resident
            mine = src is None or src == me
            rows = (
                _expert_rows(zg, zu, token, sizes, e0, e1, read(range(e0, e1)), fn)
                if mine
                else None
            )
            if src is not None:
                # padded to a few row counts: one broadcast program per size, not per chunk
                n = int(offs[e1] - offs[e0])
                shape = (geometric_bucket(n), owners.width)
                rows = broadcast_from(
                    src, _padded_rows(np.asarray(rows), shape[0]) if mine else None, shape,
                    owners.dtype,
                )[:n]  # fmt: skip
            yield int(offs[e0]), int(offs[e1]), range(e0, e1), rows


def _combined_rows(
    zg: jax.Array,
    zu: jax.Array,
    plan,
    chunk: int | None,
    read: Callable[[range], dict[str, np.ndarray]],
    width: int,
    dtype: Any,
    fn: ExpertFn = PLAIN,
    ranges: Sequence[tuple[int, int, int]] | None = None,
) -> jax.Array:
    """`combine(plan, _sorted_rows(...).astype(dtype), N)` without the [N·k, width] sorted outputs:
    each chunk's rows are weighted and added into the [N, width] float32 result as soon as they
    are computed. combine's scatter-add adds a token's rows in sorted order (expert order) one
    after another, and one expert's rows hold each token at most once, so adding expert by expert
    in order is the same sequence of float32 additions — the same bits — at 1/k of the memory
    (at DeepSeek-V3 dims with top-8 the sorted outputs were 0.9 GiB, twice over).

    `ranges` (several processes, each holding only its own experts: `Owners`): each chunk's rows
    come from the process that owns it, and every process adds them in the same order."""
    sizes, token = np.asarray(plan.group_sizes), np.asarray(plan.token)
    weight = np.asarray(plan.weight, np.float32)
    acc = np.zeros((zg.shape[0], width), np.float32)
    owners = None if ranges is None else Owners(tuple(ranges), width, np.dtype(dtype))
    for start, _, experts, rows in _chunk_rows(zg, zu, token, sizes, chunk, read, fn, owners):
        # as combine receives them (rounded to `dtype`); numpy's rounding to bfloat16/float16
        # is XLA's (to nearest even), and needs no program per chunk shape
        rows = np.asarray(rows).astype(np.dtype(dtype)).astype(np.float32)
        lo = start
        for e in experts:
            hi = lo + int(sizes[e])
            acc[token[lo:hi]] += rows[lo - start : hi - start] * weight[lo:hi, None]
            lo = hi
        del rows
    return jnp.asarray(acc)


def sorted_expert_outputs(
    xs: jax.Array, sizes: np.ndarray, source: ExpertSource, chunk: int | None
) -> np.ndarray:
    """Outputs [M, D] of the original experts for their sorted rows `xs` (group sizes `sizes`),
    `chunk` experts at a time, identical to `grouped_swiglu` over the whole layer."""
    token = np.arange(xs.shape[0])
    return _sorted_rows(xs, xs, token, sizes, chunk, source.read, xs.shape[-1])


class StreamedExperts:
    """The original routed experts of a layer as the MoE block calls them (`Experts`), read from
    their source a chunk at a time: the whole-model budget's tables pass and non-sequential runs
    feed the next layer these outputs.

    `ranges` (several processes: (first, end, process) of each, `ExpertLayout.process_ranges`):
    each process reads and computes only its own experts' rows and receives the others' rows
    (`_chunk_rows`, the same float32 additions in the same order as one process computing all);
    without, every process reads and computes every expert."""

    def __init__(
        self,
        source: ExpertSource,
        chunk: int | None,
        ranges: Sequence[tuple[int, int, int]] | None = None,
    ):
        self.source, self.chunk, self.ranges = source, chunk, ranges

    def __call__(
        self, x: jax.Array, plan, bias: dict | None = None, act: GluActivation = SWIGLU
    ) -> jax.Array:
        fn = ExpertFn.of(act, bias)
        y = _combined_rows(
            x, x, plan, self.chunk, self.source.read, x.shape[-1], x.dtype, fn, self.ranges
        )
        return y if bias is None else y + down_bias_term(plan, bias["down"], x.shape[0])


def expert_factors(pm: PackedMatrix, num_experts: int, experts: Sequence[int]) -> np.ndarray:
    """float32 [len(experts), r, n] of some experts' dequantized factors: exactly their rows of
    `dequantize_packed(pm)` (elementwise decoding), without the other experts' ([E, r, n] float32
    is the layer's size)."""
    r = pm.num_units // num_experts
    units = (np.asarray(list(experts), np.int64)[:, None] * r + np.arange(r)).reshape(-1)
    stored = np.empty(pm.num_units, np.int64)
    stored[np.asarray(pm.perm)] = np.arange(pm.num_units)
    pos = stored[units]
    out = np.zeros((units.size, pm.n), np.float32)
    start = 0
    for i, size in enumerate(pm.seg_sizes):
        sel = np.flatnonzero((pos >= start) & (pos < start + size))
        if sel.size and pm.seg_bits[i] != 0:
            # padded with zero units to a few sizes (`geometric_bucket`): units are decoded one
            # by one, so the real units' values do not change, and the compiled decoders are
            # a few per segment width instead of one per chunk
            k = geometric_bucket(int(sel.size))
            which = pos[sel] - start
            sub = dataclasses.replace(
                pm,
                perm=np.arange(k, dtype=np.int32),
                payload=(_padded_rows(np.asarray(pm.payload[i])[which], k),),
                scales=(_padded_rows(np.asarray(pm.scales[i])[which], k),),
                seg_bits=(pm.seg_bits[i],),
                seg_sizes=(k,),
            )
            out[sel] = np.asarray(dequantize_bucket(sub))[: sel.size]
        start += size
    return out.reshape(len(units) // r if r else 0, r, pm.n)


def _padded_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """`a` with zero rows appended up to `rows` rows."""
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


class _FactorsOnDemand(Mapping):
    """A chunk's dequantized factors {projection: [n, D, F]-like}, each decoded when the forward
    asks for it and not kept: `_expert_rows` takes gate, up and down one after another, so one
    projection's float32 factors (and their device copy) are alive at a time, not three."""

    def __init__(self, pms: dict[str, PackedMatrix], num_experts: int, mine: range, dtype: Any):
        self.pms, self.num_experts, self.mine, self.dtype = pms, num_experts, mine, dtype

    def __getitem__(self, p: str) -> jax.Array:
        f = expert_factors(self.pms[p], self.num_experts, self.mine)
        return jnp.asarray(np.swapaxes(f, 1, 2) if p == "down" else f).astype(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(PROJECTIONS)

    def __len__(self) -> int:
        return len(PROJECTIONS)


class StreamedQuantizedExperts:
    """A `QuantizedExperts` as its XLA path computes it (`backend="xla"`), with the factors
    dequantized a chunk of experts at a time instead of all at once — for the next layer's
    calibration input, where the layer's dense factors would be its whole float32 size.

    `ranges` (several processes): `experts` is this process's shard (`pack_layer(own_only=True)`),
    the experts [first, end) of its entry in `ranges` ((first, end, process) of every process,
    `ExpertLayout.process_ranges`); each process computes its experts' rows and receives the
    others' (`_chunk_rows`), so no process holds another's packed factors."""

    def __init__(
        self,
        experts,
        chunk: int | None,
        ranges: Sequence[tuple[int, int, int]] | None = None,
    ):
        self.experts, self.chunk, self.ranges = experts, chunk, ranges
        me = jax.process_index()
        self.first = next((lo for lo, _, q in ranges or () if q == me), 0)

    def __call__(
        self, x: jax.Array, plan, bias: dict | None = None, act: GluActivation = SWIGLU
    ) -> jax.Array:
        qe, dt = self.experts, x.dtype
        fn = ExpertFn.of(act, bias)
        vg, vu, ud = (qe.basis_matrix(p) for p in PROJECTIONS)
        zg = x if vg is None else x @ vg.astype(dt)  # per token: gathered a chunk at a time
        zu = x if vu is None else x @ vu.astype(dt)
        pms = {p: qe.packed_matrix(p) for p in PROJECTIONS}

        def read(experts: range) -> _FactorsOnDemand:
            mine = range(experts.start - self.first, experts.stop - self.first)
            return _FactorsOnDemand(pms, qe.num_experts, mine, dt)

        # components per expert (a process holding only padding experts has none to count)
        width = (
            pms["down"].num_units // qe.num_experts
            if qe.num_experts
            else (x.shape[-1] if ud is None else ud.shape[1])
        )
        acc = _combined_rows(zg, zu, plan, self.chunk, read, width, dt, fn, self.ranges)
        y = acc if ud is None else acc @ ud.T
        return y if bias is None else y + down_bias_term(plan, bias["down"], x.shape[0])


def detect_super_experts(
    x: jax.Array,
    plan: RoutingPlan,
    source: ExpertSource,
    chunk: int | None,
    threshold: float,
    fn: ExpertFn = PLAIN,
) -> list[int]:
    """`layer_problem.detect_super_experts` over a streamed layer (x: the experts' input)."""
    sizes, token = np.asarray(plan.group_sizes), np.asarray(plan.token)
    y = _sorted_rows(x, x, token, sizes, chunk, source.read, x.shape[-1], fn)
    if fn.bias is not None:
        y += fn.rows("down", np.repeat(np.arange(len(sizes)), sizes))
    y = np.abs(y)
    return outlier_experts(y, sizes, threshold)
