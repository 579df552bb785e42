"""One MoE layer's quantization problem, from its weights and calibration input to packed factors.

    MoE input x → shared bases (Gram → eigh, `decompose`) → expert factors → routing statistics
    (`calibrate`) → loss coefficients L(e,k,b) (`coefficients`) → bit allocation (`allocate`) →
    error-feedback rounding and packing (`error_feedback`, `packing`)

`streamed.build_problem` runs the stages up to the coefficients, a chunk of experts at a time, and
returns a `LayerProblem`, which is all that is needed to (re-)allocate at any budget
(`allocate_layers`, over one layer or all MoE layers of a model) and to round and pack at the
allocated bits (`streamed.round_and_pack`). The whole-layer helpers here (`make_bases`,
`detect_super_experts`) are the readable reference the streamed stages are tested against.

Budget accounting is in bits per original expert weight and covers every stored bit of the expert
path: integer codes, group scales, permutations and the shared bases. Components that receive 0 bits
in every expert are removed from the bases, and the bits this frees are offered back to the
allocation (a short fixed-point loop that never exceeds the budget).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method import sharded
from bitsmoe_jax.method.allocate import Allocation, BudgetError, allocate
from bitsmoe_jax.method.calibrate import ExpertStats
from bitsmoe_jax.method.coefficients import (
    PROJECTIONS,
    Coefficients,
)
from bitsmoe_jax.method.component_selection import select_components
from bitsmoe_jax.method.error_feedback import CalibrationInputs
from bitsmoe_jax.method.packing import (
    permutation_bits,
)
from bitsmoe_jax.method.sharded import ExpertLayout
from bitsmoe_jax.method.unit_store import UnitStore
from bitsmoe_jax.models.moe import MoEBlock, grouped_swiglu


@dataclasses.dataclass
class LayerProblem:
    """Everything needed to (re-)allocate and pack one MoE layer."""

    index: int
    num_experts: int
    hidden: int
    inter: int
    store: UnitStore  # the units [E, r, F] and their loss weights, read a chunk at a time
    coeffs: Coefficients
    bases: dict[str, dict[str, np.ndarray]]  # stored: {"q": ..., "scale": ...}
    basis_bits: int
    stats: ExpertStats
    super_experts: list[int]
    super_bits: int
    group_size: int
    # The layer's calibration inputs and routing, for GPTQ-style rounding (rounding="gptq"); None =
    # nearest.
    calib: CalibrationInputs | None = None
    # With several basis precisions to choose from: the predicted loss of the layer's allocation
    # at each ({str(bits): loss}; `run/basis_precision.py`); None when the precision was fixed.
    basis_choice: dict[str, float] | None = None
    # What the budget counts (`MethodConfig.budget_counts`): "stored" bits, or the bits a batch-1
    # decode step reads per routed expert weight, with `top_k` experts routed per token.
    budget_counts: str = "stored"
    top_k: int = 1

    @property
    def num_weights(self) -> int:
        return 3 * self.num_experts * self.hidden * self.inter

    def rank(self, p: str) -> int:
        return self.store.rank(p)

    def unit_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """loss [U, C], cost [U, C] over all units (gate, up, down; expert-major), and a fixed mask
        [U]."""
        c = len(self.coeffs.candidates)
        loss = np.concatenate([self.coeffs.loss[p].reshape(-1, c) for p in PROJECTIONS])
        # every unit has the same costs: a read-only view, not a [U, C] float64 copy
        cost = np.broadcast_to(self.coeffs.cost.astype(np.float64), loss.shape)
        fixed = np.zeros(loss.shape[0], bool)
        if self.super_experts:
            off = 0
            for p in PROJECTIONS:
                r = self.rank(p)
                for e in self.super_experts:
                    fixed[off + e * r : off + (e + 1) * r] = True
                off += self.num_experts * r
        return loss, cost, fixed

    def split(self, flat_bits: np.ndarray) -> dict[str, np.ndarray]:
        out, off = {}, 0
        for p in PROJECTIONS:
            n = self.num_experts * self.rank(p)
            out[p] = flat_bits[off : off + n].reshape(self.num_experts, self.rank(p))
            off += n
        return out

    def overhead_bits(self, bits: dict[str, np.ndarray]) -> float:
        """Bases (kept components only) + permutations for an allocation, in budget bits."""
        return sum(self.overhead(p, self.kept(p, bits[p]).size) for p in PROJECTIONS)

    def full_overhead_bits(self) -> float:
        return sum(self.overhead(p, self.rank(p)) for p in PROJECTIONS)

    def overhead(self, p: str, kept: int) -> float:
        """Budget bits of projection `p`'s basis and permutation with `kept` components.

        Stored: the bits written. Decode: what a batch-1 step reads, scaled like the units (whose
        stored bits a step reads for one token in E/k): the basis whole for every token, so E/k
        times its stored bits, and an expert's permutation entries in their int32 container.
        """
        basis = (
            basis_lib.basis_stored_bits(self.hidden, kept, self.basis_bits) if self.bases[p] else 0
        )
        if self.budget_counts == "decode":
            return basis * self.num_experts / self.top_k + 32 * self.num_experts * kept
        return basis + permutation_bits(self.num_experts * kept)

    def kept_overhead(self, keep: np.ndarray) -> float:
        """Budget bits of the bases and permutations keeping the components `keep` marks (bool,
        numbered as in `components`); a projection keeping none still stores one (`kept`)."""
        total, off = 0.0, 0
        for p in PROJECTIONS:
            r = self.rank(p)
            total += self.overhead(p, max(int(keep[off : off + r].sum()), 1))
            off += r
        return total

    def components(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(each unit's component [U] (numbered projection after projection), each component's
        charge [n]: the budget bits of keeping it, the budget bits of keeping none [3]) — what
        `component_selection` needs; only for a decode budget, whose overhead is linear in the
        components kept."""
        ids, charge, base, off = [], [], [], 0
        for p in PROJECTIONS:
            r = self.rank(p)
            ids.append(off + np.tile(np.arange(r), self.num_experts))
            base.append(self.overhead(p, 0))
            charge.append(np.full(r, self.overhead(p, 1) - base[-1]))
            off += r
        return np.concatenate(ids), np.concatenate(charge), np.array(base)

    def kept(self, p: str, bits: np.ndarray) -> np.ndarray:
        """Components stored: those with bits in some expert (all of them without a basis to
        shrink)."""
        if not self.bases[p]:
            return np.arange(self.rank(p))
        keep = np.flatnonzero(np.any(bits > 0, axis=0))
        return keep if keep.size else np.array([0])  # one all-zero component keeps shapes valid


def solve_units(
    loss: np.ndarray,
    cost: np.ndarray,
    fixed: np.ndarray,
    candidates: Sequence[int],
    super_bits: int,
    budget: float,
    zero: np.ndarray | None = None,
    **kw: Any,
) -> tuple[np.ndarray, Allocation | None]:
    """Allocate bits to the free units under `budget`; fixed (super-expert) units get
    `super_bits`, units of dropped components (`zero`) get 0."""
    cands = list(candidates)
    bits = np.zeros(loss.shape[0], np.int64)
    fixed_cost = 0.0
    if fixed.any():
        if super_bits not in cands:
            raise ValueError(
                f"super_expert_bits={super_bits} must be one of the candidates {cands}"
            )
        ci = cands.index(super_bits)
        bits[fixed] = super_bits
        fixed_cost = float(cost[fixed, ci].sum())
    free = ~fixed if zero is None else ~fixed & ~zero
    if not free.any():
        return bits, None
    if not free.all():  # (a boolean index copies the [U, C] tables)
        loss = loss[free]
        cost = (
            np.broadcast_to(cost[0], (int(free.sum()), cost.shape[1]))
            if cost.strides[0] == 0  # one cost row for every unit: stays a view
            else cost[free]
        )
    alloc = allocate(loss, cost, budget - fixed_cost, **kw)
    bits[free] = np.asarray(cands)[alloc.choice]
    return bits, alloc


def _attempt(
    group: list[LayerProblem],
    loss: np.ndarray,
    cost: np.ndarray,
    fixed: np.ndarray,
    zero: np.ndarray | None,
    unit_budget: float,
    kw: dict,
) -> tuple[float, list[dict], Allocation | None]:
    """(bits spent, per-layer bits, allocation) of one solve of `group`'s units within
    `unit_budget` bits; the spent bits count the layers' overheads at the bits found."""
    cands, sb = group[0].coeffs.candidates, group[0].super_bits
    col_of = np.zeros(max(cands) + 1, np.int64)  # bit-width -> its column of the tables
    col_of[list(cands)] = np.arange(len(cands))
    flat, alloc = solve_units(loss, cost, fixed, cands, sb, unit_budget, zero, **kw)
    per_layer, off = [], 0
    for p in group:
        n = sum(p.num_experts * p.rank(q) for q in PROJECTIONS)
        per_layer.append(p.split(flat[off : off + n]))
        off += n
    cols = col_of[flat]
    spent = float(cost[np.arange(len(flat)), cols].sum()) + sum(
        p.overhead_bits(b) for p, b in zip(group, per_layer, strict=False)
    )
    return spent, per_layer, alloc


def _dropped_units(
    group: list[LayerProblem], loss: np.ndarray, cost: np.ndarray, fixed: np.ndarray, total: float
) -> tuple[np.ndarray | None, float]:
    """Under a decode budget: (units of the components `component_selection` drops [U], budget
    bits of the kept components' bases and permutations). Under a stored budget: (None, the
    full-rank overhead), the allocation dropping only what every expert gives 0 bits."""
    with_bases = all(p.bases[q] for p in group for q in PROJECTIONS)
    if group[0].budget_counts != "decode" or not with_bases:
        return None, sum(p.full_overhead_bits() for p in group)
    cands = list(group[0].coeffs.candidates)
    if 0 not in cands:
        raise ValueError("budget_counts='decode' needs 0 among candidate_bits (to drop components)")
    parts = [p.components() for p in group]
    offsets = np.cumsum([0] + [len(charge) for _, charge, _ in parts])
    component = np.concatenate(
        [ids + off for (ids, _, _), off in zip(parts, offsets[:-1], strict=True)]
    )
    charge = np.concatenate([c for _, c, _ in parts])
    base = float(sum(b.sum() for _, _, b in parts))
    fixed_col = np.where(fixed, cands.index(group[0].super_bits) if fixed.any() else -1, -1)
    keep = select_components(loss, cost, fixed_col, component, charge, total - base, cands.index(0))
    overhead = sum(
        p.kept_overhead(keep[start:end])
        for p, start, end in zip(group, offsets[:-1], offsets[1:], strict=True)
    )
    return ~keep[component], overhead


def _joined_costs(costs: list[np.ndarray]) -> np.ndarray:
    """The layers' [U, C] cost tables one after the other: still a broadcast view when every
    layer has the same per-candidate costs (the usual case: one group size and width per run)."""
    first = costs[0][0] if costs[0].shape[0] else None
    if first is not None and all(c.shape[0] and np.array_equal(c[0], first) for c in costs):
        return np.broadcast_to(first, (sum(c.shape[0] for c in costs), first.shape[0]))
    return np.concatenate(costs)


def allocate_layers(
    problems: list[LayerProblem], budget_bits: float, scope: str, alloc_kw: dict
) -> dict[int, tuple[dict, list[Allocation]]]:
    """Bits per unit for each layer under a per-layer or whole-model budget.

    The bases' cost depends on the allocation (components with 0 bits in every expert are not
    stored), so the budget left for the units is searched: start from the budget minus the
    bases of the components allowed (always feasible), then bisect on the units' budget with the
    fast greedy for the largest one whose units + kept bases + permutations still fit; the
    configured allocator then solves at that budget (its answer is used only if it also fits).
    Under a decode budget the components allowed are chosen first (`component_selection`).
    """
    groups = [[p] for p in problems] if scope == "layer" else [problems]
    out: dict[int, tuple[dict, list[Allocation]]] = {}
    for group in groups:
        arrays = [p.unit_arrays() for p in group]
        loss = np.concatenate([a[0] for a in arrays]) if len(arrays) > 1 else arrays[0][0]
        cost = _joined_costs([a[1] for a in arrays])
        fixed = np.concatenate([a[2] for a in arrays])
        del arrays
        nw = sum(p.num_weights for p in group)
        total = budget_bits * nw
        try:
            zero, overhead = _dropped_units(group, loss, cost, fixed, total)
        except BudgetError as e:
            raise BudgetError(
                f"budget {budget_bits} bits read per routed expert weight is too small for layers "
                f"{[p.index for p in group]} (budget_counts='decode'): {e}"
            ) from e
        attempt = functools.partial(_attempt, group, loss, cost, fixed, zero)

        lo, hi = total - overhead, total
        try:
            _, best_bits, best_alloc = attempt(lo, {"allocator": "greedy"})
        except BudgetError as e:
            cheapest = cost.min(axis=1)
            if fixed.any():
                sb_col = list(group[0].coeffs.candidates).index(group[0].super_bits)
                cheapest = np.where(fixed, cost[:, sb_col], cheapest)
            minimum = (float(cheapest.sum()) + overhead) / nw
            # one unit throughout (bits per expert weight), not the allocator's total bits
            raise BudgetError(
                f"budget {budget_bits} bits per expert weight is below the minimum of "
                f"{minimum:.4f} bits per expert weight that layers {[p.index for p in group]} "
                f"need (shared bases and permutations {overhead / nw:.4f} + every unit at its "
                f"cheapest bit-width {float(cheapest.sum()) / nw:.4f}); choose budget_bits >= "
                f"{math.ceil(minimum * 1e4) / 1e4:.4f}"
            ) from e
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            spent, bits, alloc = attempt(mid, {"allocator": "greedy"})
            if spent <= total:
                lo, best_bits, best_alloc = mid, bits, alloc
            else:
                hi = mid
        if alloc_kw.get("allocator", "auto") != "greedy":
            spent, bits, alloc = attempt(lo, alloc_kw)
            if spent <= total:
                best_bits, best_alloc = bits, alloc
        for p, b in zip(group, best_bits, strict=False):
            out[p.index] = (b, [best_alloc] if best_alloc is not None else [])
    return out


def dequantized_basis(stored: dict[str, np.ndarray]) -> np.ndarray | None:
    """The basis as the quantized model uses it (int8 codes × row scales, or bf16); None =
    identity."""
    if "q" not in stored:
        return None
    q = np.asarray(stored["q"], np.float32)
    return q * np.asarray(stored["scale"], np.float32)[:, None] if "scale" in stored else q


# ------------------------------------------------------------------------------------ layer stages
def _whitening(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C^{1/2} and C^{-1/2} of the input second moment C = xᵀx/N (damped by 1e-4 of its mean
    diagonal)."""
    x = np.asarray(x, np.float64)
    c = x.T @ x / max(len(x), 1)
    c += 1e-4 * max(float(np.mean(np.diag(c))), 1e-12) * np.eye(c.shape[0])
    lam, q = np.linalg.eigh(c)
    lam = np.maximum(lam, 1e-12)
    return (q * np.sqrt(lam)) @ q.T, (q / np.sqrt(lam)) @ q.T


def make_bases(
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    rank: int | None,
    basis_bits: int,
    kind: str = "svd",
    x: np.ndarray | None = None,
    layout: ExpertLayout | None = None,
):
    """Shared bases from the expert-summed Gram matrices; returns (stored, dequantized) per
    projection.

    The Gram sums run sharded over the experts of `layout` (default: one device) in an order fixed
    by the expert index, so the bases are bit-identical on every mesh (`quant/sharded.py`); the
    small eigendecompositions then run on this process's first device.

    kind="svd": eigenvectors of Σ_e W_eᵀW_e (the stacked-weight SVD). kind="whitened" (ablation):
    gate/up bases from the SVD of the activation-whitened stack [W_e C^{1/2}] with C = E[x xᵀ] over
    the calibration inputs `x`, mapped back as C^{-1/2}V and orthonormalised by QR (same leading
    spans; z = basisᵀx keeps the dataflow); down keeps the weight SVD (its basis is on the output
    side). kind="none" (ablation): no basis — the identity, stored as nothing, so the units are the
    original weight columns (gate/up) and rows (down).
    """
    if kind == "none":
        return bases_from_grams({}, gate.shape[1], rank, basis_bits, kind)
    if layout is None:
        layout = sharded.expert_layout(sharded.single_device_mesh(), gate.shape[0])
    grams = {
        p: sharded.gram_sum(
            layout,
            sharded.expert_array(layout, lambda e, w=w: w[e], w.shape[1:], np.float32),
            p == "down",
        )
        for p, w in (("gate", gate), ("up", up), ("down", down))
    }
    return bases_from_grams(grams, gate.shape[1], rank, basis_bits, kind, x)


def bases_from_grams(
    grams: dict[str, np.ndarray],
    hidden: int,
    rank: int | None,
    basis_bits: int,
    kind: str = "svd",
    x: np.ndarray | None = None,
):
    """(stored, dequantized) bases per projection from the expert-summed Gram matrices
    (`make_bases`, which says what `kind` does; a streamed layer sums its Grams chunk by chunk)."""
    if kind == "none":
        eye = np.eye(hidden, dtype=np.float32)
        return {p: {} for p in PROJECTIONS}, {p: eye for p in PROJECTIONS}
    whitening = basis_whitening(kind, x)
    stored, deq = {}, {}
    for p in PROJECTIONS:
        stored[p], deq[p] = projection_basis(p, grams[p], rank, basis_bits, whitening)
    return stored, deq


def basis_whitening(kind: str, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(C^{1/2}, C^{-1/2}) for kind="whitened" (`projection_basis`), None for the other kinds."""
    if kind != "whitened":
        return None
    if x is None:
        raise ValueError("the whitened basis needs the calibration inputs x")
    return _whitening(x)


def projection_basis(
    p: str,
    gram: np.ndarray,
    rank: int | None,
    basis_bits: int,
    whitening: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One projection's (stored, dequantized) basis from its Gram matrix: a streamed layer builds
    each as soon as its Gram is summed, so only one D×D Gram is alive at a time."""
    return quantized_basis(projection_vectors(p, gram, rank, whitening), basis_bits)


def projection_vectors(
    p: str,
    gram: np.ndarray,
    rank: int | None,
    whitening: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """One projection's float32 basis ``[D, r]`` before quantization (`projection_basis`)."""
    if whitening is not None and p != "down":
        c_half, c_inv_half = whitening
        g = c_half @ np.asarray(gram, np.float64) @ c_half
        v, _ = basis_lib.basis_from_gram(jnp.asarray(g, jnp.float32), rank)
        # C^{-1/2}V spans, prefix by prefix, the directions that matter most for the layer
        # output; orthonormalise it (QR keeps every leading span) so that it stores at 8 bits
        # like the SVD basis — unnormalised, its rows span a dynamic range int8 rows cannot
        # hold.
        q, r = np.linalg.qr(c_inv_half @ np.asarray(v, np.float64))
        v = jnp.asarray(q * np.sign(np.diag(r))[None, :], jnp.float32)
    else:
        v, _ = basis_lib.basis_from_gram(jnp.asarray(gram), rank)
    return np.asarray(v, np.float32)


def quantized_basis(v: np.ndarray, basis_bits: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(stored codes and scales — the problem's form, unpacked —, dequantized float32 basis)."""
    st, dq = basis_lib.quantize_basis(jnp.asarray(v, jnp.float32), basis_bits)
    stored = {"q": np.asarray(st.values)} | (
        {"scale": np.asarray(st.scales)} if st.scales is not None else {}
    )
    return stored, np.asarray(dq, np.float32)


def detect_super_experts(x: jax.Array, block: MoEBlock, threshold: float) -> list[int]:
    """Experts whose routed outputs carry extreme outliers: max|y| above `threshold` × the median
    expert's."""
    x, plan = block.expert_inputs(x)
    y = np.abs(
        np.asarray(
            grouped_swiglu(
                x[plan.token],
                plan.group_sizes,
                block.experts.gate[...],
                block.experts.up[...],
                block.experts.down[...],
            )
        )
    )
    return outlier_experts(y, np.asarray(plan.group_sizes), threshold)


def outlier_experts(y: np.ndarray, sizes: np.ndarray, threshold: float) -> list[int]:
    """Experts whose peak |output| over their sorted rows of `y` exceeds `threshold` × the median
    expert's peak (experts with no rows are never outliers)."""
    offs = np.concatenate([[0], np.cumsum(sizes)])
    peaks = np.array(
        [y[offs[e] : offs[e + 1]].max() if sizes[e] else 0.0 for e in range(len(sizes))]
    )
    med = np.median(peaks[peaks > 0]) if (peaks > 0).any() else 0.0
    return [int(e) for e in np.flatnonzero(peaks > threshold * med)] if med > 0 else []


def bits_histogram(bits: dict[str, np.ndarray], candidates: Sequence[int]) -> dict[str, int]:
    allb = np.concatenate([b.reshape(-1) for b in bits.values()])
    return {str(b): int((allb == b).sum()) for b in candidates}
