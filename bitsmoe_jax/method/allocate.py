"""Bit allocation: a multiple-choice knapsack over units (numpy + CVXPY/HiGHS).

Given ``loss[u, c]`` (the surrogate loss ``L(unit, b_c)``) and ``cost[u, c]`` (every stored bit of
unit ``u`` at candidate ``c``), pick exactly one candidate per unit with ``Σ cost <= budget`` and
the smallest ``Σ loss``.

* :func:`solve_milp` is the specification: a CVXPY mixed-integer program with a boolean
  ``y[u, c]``, solved by HiGHS.
* :func:`solve_greedy` solves the LP relaxation exactly. With a single coupling constraint the LP
  optimum takes, for every unit, a point on the lower convex hull of its ``(cost, loss)`` points,
  and spends the budget on hull segments in order of decreasing efficiency (loss decrease per
  bit); at most one segment is fractional. Dropping that segment gives a feasible integer answer,
  and the LP value is a lower bound on the integer optimum: a certified gap, in expected linear
  time (a weighted quickselect instead of a full sort). Two cheap repairs then close most of the
  remaining gap: taking the fractional segment whole by undoing the least efficient segments
  elsewhere, and spending leftover bits on the best single-unit upgrades that still fit.

A candidate is unavailable for a unit when its loss or cost is not finite (``inf``/``nan``); use
that to forbid bit-widths per unit (e.g. to pin "super experts" at 16 bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

# What HiGHS prints from its constructor whatever its options (cvxpy makes two per solve): its
# version banner and licence line.
SOLVER_BANNER = ("Running HiGHS ", "Includes third-party software components")


@contextlib.contextmanager
def without_solver_banner() -> Iterator[None]:
    """Keep HiGHS's banner out of the run's output.

    The banner is printed by C++ code to file descriptor 1 before any option (`log_to_console`,
    `output_flag`) can be set, so Python's `sys.stdout` cannot catch it: the descriptor is pointed
    at a temporary file for the solve, and whatever else was written there meanwhile is passed on
    to the real stdout afterwards, so nothing but the banner is lost.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [ln for ln in text.splitlines(True) if not ln.startswith(SOLVER_BANNER)]
            if kept:
                sys.stdout.write("".join(kept))
                sys.stdout.flush()


class BudgetError(ValueError):
    """The budget is below the cheapest possible allocation."""


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One choice per unit and how good it is.

    ``choice [U]`` indexes the candidate axis; ``objective = Σ loss[u, choice[u]]``;
    ``total_cost = Σ cost[u, choice[u]]`` (<= ``budget``); ``lower_bound`` is a proven lower bound
    on the optimal objective (LP relaxation, or the MILP solver's dual bound if tighter);
    ``gap = (objective - lower_bound) / |objective|`` (0 when the objective is 0).
    """

    choice: np.ndarray
    objective: float
    total_cost: float
    lower_bound: float
    gap: float
    solver: str
    time_s: float
    budget: float


@dataclasses.dataclass(frozen=True)
class _Problem:
    loss: np.ndarray  # [U, C] float64, +inf where unavailable
    cost: np.ndarray  # [U, C] float64, +inf where unavailable
    avail: np.ndarray  # [U, C] bool
    min_cost: np.ndarray  # [U]
    budget: float


def _prepare(loss: np.ndarray, cost: np.ndarray, budget: float) -> _Problem:
    loss = np.asarray(loss, np.float64)
    cost = np.asarray(cost, np.float64)
    if loss.ndim != 2 or loss.shape != cost.shape:
        raise ValueError(f"loss and cost must both be [U, C]; got {loss.shape} and {cost.shape}")
    budget = float(budget)
    if not np.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    avail = np.isfinite(loss) & np.isfinite(cost)
    if not avail.all():
        if loss.shape[0] and not avail.any(axis=1).all():
            bad = np.flatnonzero(~avail.any(axis=1))
            raise ValueError(
                f"{bad.size} unit(s) have no available candidate (first: unit {bad[0]})"
            )
        loss = np.where(avail, loss, np.inf)
        cost = np.where(avail, cost, np.inf)
    min_cost = cost.min(axis=1) if loss.shape[0] else np.zeros(0)
    min_total = float(min_cost.sum())
    if budget < min_total:
        raise BudgetError(
            f"budget of {budget:.0f} bits is below the minimum achievable {min_total:.0f} bits "
            f"(every one of {loss.shape[0]} units at its cheapest candidate); raise the budget "
            f"by at least {min_total - budget:.0f} bits"
        )
    return _Problem(loss, cost, avail, min_cost, budget)


def _evaluate(p: _Problem, choice: np.ndarray) -> tuple[float, float]:
    r = np.arange(p.loss.shape[0])
    return float(p.loss[r, choice].sum()), float(p.cost[r, choice].sum())


def _gap(objective: float, lower_bound: float) -> float:
    if objective == 0.0:
        return 0.0
    return max(0.0, (objective - lower_bound) / abs(objective))


@dataclasses.dataclass(frozen=True)
class _Hull:
    """Per-unit hull segments, laid out ``[U, C-1]`` (segment ``h`` joins vertex ``h`` to ``h+1``).

    ``dcost > 0`` and ``dloss < 0`` on real segments; ``eff = -dloss/dcost`` is non-increasing
    along ``h`` and ``-inf`` on padding. Vertex candidate indices are ``perm[u, h]`` for units not
    in ``hard`` (every cost-sorted point is a vertex) and ``hard_verts[i, h]`` for unit
    ``hard[i]``.
    """

    perm: np.ndarray | None  # [U, C] cost order, None when the candidates already are in cost order
    hard: np.ndarray  # [V] units that needed the monotone chain
    hard_verts: np.ndarray  # [V, C]
    dcost: np.ndarray
    dloss: np.ndarray
    eff: np.ndarray

    def vertex(self, h: np.ndarray) -> np.ndarray:
        """Candidate index of hull vertex ``h[u]`` of every unit."""
        u_count = h.shape[0]
        if self.perm is None:
            out = h.astype(np.int64, copy=True)
        else:
            out = self.perm.reshape(-1)[np.arange(u_count) * self.perm.shape[1] + h]
        if self.hard.size:
            c_count = self.hard_verts.shape[1]
            out[self.hard] = self.hard_verts.reshape(-1)[
                np.arange(self.hard.size) * c_count + h[self.hard]
            ]
        return out


def _chain(cost: np.ndarray, loss: np.ndarray, avail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotone-chain lower hull (decreasing part) of rows whose points are sorted by cost.

    Returns ``(stack [V, C] column indices, size [V])``. Vectorised over rows; a point is pushed
    only if it lowers the loss below the current top (dominated points never enter), and before
    the push the top is popped while it has the same cost or lies strictly above the line from
    the element below it to the new point. Collinear points are kept, so they remain available as
    integer stopping points.
    """
    v, c_count = cost.shape
    base = np.arange(v) * c_count
    st = np.zeros(v * c_count, np.int64)
    sc = np.zeros(v * c_count)  # cost of stack entries (flat [V, C])
    sl = np.zeros(v * c_count)  # loss of stack entries
    sz = np.zeros(v, np.int64)
    for j in range(c_count):
        cj, lj = cost[:, j], loss[:, j]
        push = avail[:, j] & ((sz == 0) | (lj < sl[base + np.maximum(sz - 1, 0)]))
        cand = np.flatnonzero(push)
        while cand.size:
            n_c = sz[cand]
            top = base[cand] + np.maximum(n_c - 1, 0)
            below = base[cand] + np.maximum(n_c - 2, 0)
            cb, lb, ca, la = sc[top], sl[top], sc[below], sl[below]
            c_new, l_new = cj[cand], lj[cand]
            same_cost = (n_c >= 1) & (cb == c_new)
            above = (n_c >= 2) & ((lb - la) * (c_new - ca) > (l_new - la) * (cb - ca))
            pop = same_cost | above
            sz[cand[pop]] -= 1
            cand = cand[pop]
        pos = base[push] + sz[push]
        st[pos] = j
        sc[pos] = cj[push]
        sl[pos] = lj[push]
        sz += push
    return st.reshape(v, c_count), sz


def _lower_hulls(p: _Problem) -> _Hull:
    """Decreasing part of the lower convex hull of every unit's (cost, loss) points.

    Fast path first: when a unit's candidates, in cost order, strictly increase in cost, strictly
    decrease in loss and have non-increasing efficiency (loss decrease per bit) — the usual shape
    of ``κ_b ‖x‖²`` — every point is a hull vertex. The remaining units (non-convex losses, ties,
    unavailable candidates) go through a vectorised monotone chain. Points that do not lower the
    loss — dominated ones — never become vertices.
    """
    u_count, c_count = p.loss.shape
    cost, loss = p.cost, p.loss
    if np.all(cost[:, 1:] >= cost[:, :-1]):
        perm = None
        cs, ls, avail_s = cost, loss, p.avail
    else:
        perm = np.argsort(cost, axis=1, kind="stable")
        flat = (np.arange(u_count) * c_count)[:, None] + perm
        cs, ls, avail_s = cost.reshape(-1)[flat], loss.reshape(-1)[flat], p.avail.reshape(-1)[flat]
    with np.errstate(invalid="ignore", divide="ignore"):
        dcost = np.diff(cs, axis=1)
        dloss = np.diff(ls, axis=1)
        eff = -dloss / dcost
    simple = np.all((dcost > 0) & (dloss < 0), axis=1)
    if c_count > 2:
        simple &= np.all(eff[:, 1:] <= eff[:, :-1], axis=1)
    hard = np.flatnonzero(~simple)
    hard_verts = np.zeros((hard.size, c_count), np.int64)
    if hard.size:
        if hard.size == u_count:  # skip the row gathers when every unit needs the chain
            st, sz = _chain(cs, ls, avail_s)
        else:
            st, sz = _chain(cs[hard], ls[hard], avail_s[hard])
        # Pad past the end with the last vertex so that gathers stay in range.
        last = st[np.arange(hard.size), sz - 1]
        valid_v = np.arange(c_count)[None, :] < sz[:, None]
        st = np.where(valid_v, st, last[:, None])
        hard_verts = st if perm is None else np.take_along_axis(perm[hard], st, axis=1)
        hc = np.take_along_axis(cs[hard], st, axis=1)
        hl = np.take_along_axis(ls[hard], st, axis=1)
        valid = valid_v[:, 1:]
        h_dcost = np.where(valid, np.diff(hc, axis=1), 0.0)
        h_dloss = np.where(valid, np.diff(hl, axis=1), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            h_eff = np.where(valid, -h_dloss / np.where(valid, h_dcost, 1.0), np.inf)
        # Floating-point rounding can make a later segment of a hull look a hair more efficient
        # than the one before it; the selection relies on per-unit monotonicity, so enforce it.
        h_eff = np.where(valid, np.minimum.accumulate(h_eff, axis=1), -np.inf)
        dcost[hard], dloss[hard], eff[hard] = h_dcost, h_dloss, h_eff
    return _Hull(perm, hard, hard_verts, dcost, dloss, eff)


_MOVE_BLOCK = 1 << 18  # units whose candidate moves `_fix_up` lists at a time


def _fix_up(
    p: _Problem, choice: np.ndarray, leftover: float, max_moves: int = 100_000
) -> tuple[np.ndarray, float]:
    """Spend leftover budget on single-unit changes that still fit, best absolute gain first.

    Only moves that lower the loss and cost at most the leftover are considered; each move
    strictly improves the objective, so the loop ends. The candidate list is built once and the
    moved unit's entries are rebuilt after each move.
    """
    choice = choice.copy()

    def moves_in(lo: int, hi: int) -> tuple[np.ndarray, ...]:
        """The moves of units [lo, hi), in row-major order (the order of one `np.nonzero` over all
        units, so that ties in the argmin below resolve as they would over the whole table)."""
        cost, loss, ch = p.cost[lo:hi], p.loss[lo:hi], choice[lo:hi]
        rows = np.arange(hi - lo)  # (not a flat index: the costs may be a broadcast view)
        dc = cost - cost[rows, ch][:, None]
        dl = loss - loss[rows, ch][:, None]
        uu, cc = np.nonzero((dl < 0) & (dc <= leftover))  # unavailable entries are inf: excluded
        return uu + lo, cc, dc[uu, cc], dl[uu, cc]

    # every unit's moves, a block of units at a time: the differences are [U, C] float64 twice
    n = p.loss.shape[0]
    parts = [moves_in(lo, min(lo + _MOVE_BLOCK, n)) for lo in range(0, n, _MOVE_BLOCK)]
    mu, mc, mdc, mdl = (np.concatenate(x) for x in zip(*parts, strict=True))
    del parts
    for _ in range(max_moves):
        if mu.size == 0:
            break
        k = int(np.argmin(mdl))
        u, c = int(mu[k]), int(mc[k])
        leftover -= float(mdc[k])
        choice[u] = c
        keep = (mu != u) & (mdc <= leftover)
        nu, nc, ndc, ndl = moves_in(u, u + 1)
        mu = np.concatenate([mu[keep], nu])
        mc = np.concatenate([mc[keep], nc])
        mdc = np.concatenate([mdc[keep], ndc])
        mdl = np.concatenate([mdl[keep], ndl])
    return choice, leftover


def _boundary_efficiency(
    eff: np.ndarray, dcost: np.ndarray, slack: float, small: int = 1 << 15
) -> float:
    """Efficiency ``λ`` of the LP's fractional segment (``-inf`` when every segment fits).

    Sorting all segments by decreasing efficiency and walking until the budget runs out is the
    definition; this finds the same segment's efficiency in expected linear time with a weighted
    quickselect (three-way split around the median of the remaining values) and sorts only the
    last ``small`` values. Only the values are needed: the caller rebuilds the taken set as
    "efficiency above ``λ``, then ties at ``λ`` in row-major order", which is exactly the stable
    order of the definition.
    """
    e, d = eff, dcost
    remaining = slack
    rng = np.random.default_rng(0)  # pivots only; the result does not depend on the seed
    while e.size > small:
        # Try a narrow window around the boundary estimated from a sample first (cuts the data
        # ~10x per pass); fall back to the median split when the estimate misses.
        m = 4096
        sample = rng.integers(0, e.size, m)
        se = e[sample]
        so = np.argsort(-se)
        pos = int(np.searchsorted(np.cumsum(d[sample][so]) * (e.size / m), remaining))
        p_hi = se[so[max(pos - 256, 0)]]
        p_lo = se[so[min(pos + 256, m - 1)]]
        above = e > p_hi
        s_above = float(d[above].sum())
        if p_lo < p_hi and s_above <= remaining:
            window = (e >= p_lo) & ~above
            if s_above + float(d[window].sum()) > remaining:
                remaining -= s_above
                e, d = e[window], d[window]
                continue
        pivot = np.partition(e, e.size // 2)[e.size // 2]
        hi = e > pivot
        s_hi = float(d[hi].sum())
        if s_hi > remaining:
            e, d = e[hi], d[hi]
            continue
        remaining -= s_hi
        eq = e == pivot
        s_eq = float(d[eq].sum())
        if s_eq > remaining:
            return float(pivot)
        remaining -= s_eq
        lo = e < pivot
        e, d = e[lo], d[lo]
    order = np.argsort(-e, kind="stable")
    cum = np.cumsum(d[order])
    k = int(np.searchsorted(cum, remaining, side="right"))
    return float(e[order[k]]) if k < order.size else -np.inf


def _greedy_core(p: _Problem, fix_up: bool) -> tuple[np.ndarray, float]:
    """Integer choice and the exact LP-relaxation value."""
    u_count, c_count = p.loss.shape
    rows = np.arange(u_count)
    hull = _lower_hulls(p)
    start = hull.vertex(np.zeros(u_count, np.int64))
    base_loss = float(p.loss[rows, start].sum())
    slack = p.budget - float(p.cost[rows, start].sum())
    finite = np.isfinite(hull.eff)
    if finite.all():  # the usual convex tables: the arrays themselves, not [U, C-1] copies
        lam = _boundary_efficiency(hull.eff.reshape(-1), hull.dcost.reshape(-1), slack)
    else:
        lam = _boundary_efficiency(hull.eff[finite], hull.dcost[finite], slack)
    del finite

    above = hull.eff > lam
    spent = float(np.sum(hull.dcost, where=above))
    lp_value = base_loss + float(np.sum(hull.dloss, where=above))
    per_unit = above.sum(axis=1)
    frac_seg = -1
    if np.isfinite(lam):
        tie = np.flatnonzero(hull.eff.reshape(-1) == lam)  # row-major = the stable sort order
        cum = np.cumsum(hull.dcost.reshape(-1)[tie])
        k = int(np.searchsorted(cum, slack - spent, side="right"))
        if k:
            take = tie[:k]
            spent += float(cum[k - 1])
            lp_value += float(hull.dloss.reshape(-1)[take].sum())
            np.add.at(per_unit, take // (c_count - 1), 1)
        if k < tie.size:
            frac_seg = int(tie[k])
            lp_value += (
                (slack - spent)
                / hull.dcost.reshape(-1)[frac_seg]
                * hull.dloss.reshape(-1)[frac_seg]
            )
    leftover = slack - spent
    choice = hull.vertex(per_unit)
    if not fix_up or frac_seg < 0:
        return choice, lp_value
    # Two integer completions of the LP solution, each topped up with the leftover budget:
    # drop the fractional segment, or take it whole and make room elsewhere. Keep the better.
    best, _ = _fix_up(p, choice, leftover)
    swapped, left2 = _swap_in_fractional(hull, per_unit, frac_seg, leftover)
    if swapped is not None:
        alt, _ = _fix_up(p, hull.vertex(swapped), left2)
        if _evaluate(p, alt)[0] < _evaluate(p, best)[0]:
            best = alt
    return best, lp_value


def _swap_in_fractional(
    hull: _Hull, per_unit: np.ndarray, frac_seg: int, leftover: float
) -> tuple[np.ndarray | None, float]:
    """Take the fractional segment whole if freeing room for it elsewhere costs less loss.

    Returns the new per-unit hull positions and leftover, or ``(None, leftover)`` when no such
    swap lowers the loss.

    The room comes from undoing the least efficient *last* taken segments of other units (undoing
    a unit's last segment keeps its hull prefix), cheapest loss per bit first. With heavy-tailed
    unit norms one fractional segment can be worth ~1e-3 of the objective, so this matters on
    small layers; on large ones it rarely changes anything.
    """
    n_seg = hull.dcost.shape[1]
    u_f = frac_seg // n_seg
    need = float(hull.dcost.reshape(-1)[frac_seg]) - leftover
    gain = -float(hull.dloss.reshape(-1)[frac_seg])
    units = np.flatnonzero(per_unit > 0)
    units = units[units != u_f]
    if units.size == 0:
        return None, leftover
    last = units * n_seg + per_unit[units] - 1
    e_last = hull.eff.reshape(-1)[last]
    for k in (min(256, units.size), units.size):
        pick = np.argpartition(e_last, k - 1)[:k] if k < units.size else np.arange(units.size)
        pick = pick[np.argsort(e_last[pick], kind="stable")]
        cum = np.cumsum(hull.dcost.reshape(-1)[last[pick]])
        m = int(np.searchsorted(cum, need, side="left"))
        if m < pick.size:
            break
    else:
        return None, leftover
    removed = last[pick[: m + 1]]
    loss_added = -float(hull.dloss.reshape(-1)[removed].sum())
    if loss_added >= gain:
        return None, leftover
    per_unit = per_unit.copy()
    per_unit[u_f] += 1
    per_unit[removed // n_seg] -= 1
    return per_unit, leftover + float(cum[m]) - float(hull.dcost.reshape(-1)[frac_seg])


def solve_greedy(
    loss: np.ndarray, cost: np.ndarray, budget: float, fix_up: bool = True
) -> Allocation:
    """Convex-hull greedy: exact LP relaxation, a feasible integer choice and its certified gap.

    With ``fix_up`` (default) the integer answer is the better of two completions of the LP
    solution — without the fractional segment, or with it and room made by undoing the least
    efficient segments of other units — each then spending its leftover bits on the best
    single-unit upgrades that still fit. Without it, the answer is the LP solution minus its
    fractional segment. The bound is the exact LP value either way.
    """
    t0 = time.perf_counter()
    p = _prepare(loss, cost, budget)
    if p.loss.shape[0] == 0:
        return Allocation(
            np.zeros(0, np.int64),
            0.0,
            0.0,
            0.0,
            0.0,
            "greedy-hull",
            time.perf_counter() - t0,
            p.budget,
        )
    choice, lp_value = _greedy_core(p, fix_up)
    obj, tot = _evaluate(p, choice)
    lb = min(lp_value, obj)
    return Allocation(
        choice=choice.astype(np.int64),
        objective=obj,
        total_cost=tot,
        lower_bound=lb,
        gap=_gap(obj, lb),
        solver="greedy-hull",
        time_s=time.perf_counter() - t0,
        budget=p.budget,
    )


def _repair(p: _Problem, choice: np.ndarray) -> np.ndarray:
    """Make a choice feasible again by the cheapest downgrades (loss added per bit freed).

    Needed only when the MIP solver's feasibility tolerance lets the knapsack row exceed the
    budget by a fraction of a bit after rounding; the cheapest candidates fit by construction.
    """
    choice = choice.copy()
    rows = np.arange(p.loss.shape[0])
    while float(p.cost[rows, choice].sum()) > p.budget:
        saved = p.cost[rows, choice][:, None] - p.cost
        added = p.loss - p.loss[rows, choice][:, None]
        ok = p.avail & (saved > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(ok, added / np.where(ok, saved, 1.0), np.inf)
        u, c = np.unravel_index(int(np.argmin(rate)), rate.shape)
        choice[u] = c
    return choice


def solve_milp(
    loss: np.ndarray,
    cost: np.ndarray,
    budget: float,
    time_limit: float = 60.0,
    mip_rel_gap: float = 1e-6,
    verbose: bool = False,
) -> Allocation:
    """The specification: CVXPY MILP with boolean ``y[U, C]`` solved by HiGHS.

    ``minimise Σ L·y  s.t.  Σ_c y[u, c] = 1 ∀u,  Σ cost·y <= budget``. For numerical stability
    the model is written in shifted, normalised units: each unit's cheapest cost and smallest loss
    are subtracted (constants under ``Σ_c y = 1``), costs are divided by the largest remaining
    cost (so they lie in [0, 1]) and losses by the shifted objective of the greedy answer (so the
    optimum is about 1 and HiGHS's absolute tolerances act as relative ones). ``mip_rel_gap``
    applies to the shifted objective, which is at most the true one.
    The returned numbers are in the original units. If the time limit stops HiGHS, its incumbent
    is returned and ``gap`` reports how far it may be from optimal — unless the greedy answer
    (always computed, for the LP bound) is better, which is then returned with ``+greedy`` in
    ``solver``.
    """
    import cvxpy as cp

    t0 = time.perf_counter()
    p = _prepare(loss, cost, budget)
    u_count, c_count = p.loss.shape
    if u_count == 0:
        return Allocation(
            np.zeros(0, np.int64),
            0.0,
            0.0,
            0.0,
            0.0,
            "milp-highs",
            time.perf_counter() - t0,
            p.budget,
        )

    min_loss = np.where(p.avail, p.loss, np.inf).min(axis=1)
    l_shift = np.where(p.avail, p.loss - min_loss[:, None], 0.0)
    c_shift = np.where(p.avail, p.cost - p.min_cost[:, None], 0.0)
    c_scale = float(c_shift.max()) or 1.0
    slack = (p.budget - float(p.min_cost.sum())) / c_scale
    # Losses are measured in units of the greedy answer's shifted objective, so the optimum is
    # about 1. HiGHS prunes and stops on absolute tolerances too (mip_abs_gap, feasibility
    # epsilons ~1e-6 in model units); with an optimum of order 1 those mean "relative", and
    # mip_rel_gap is what governs. (Normalising by the largest loss instead made an optimum of
    # 0.008 stop 1.5e-5 away from optimal while reporting "optimal".)
    greedy_choice, lp_value = _greedy_core(p, fix_up=True)
    shifted_greedy = float(l_shift[np.arange(u_count), greedy_choice].sum())
    l_scale = shifted_greedy if shifted_greedy > 0 else (float(l_shift.max()) or 1.0)
    mip_abs_gap = float(mip_rel_gap)
    y = cp.Variable((u_count, c_count), boolean=True)
    constraints = [cp.sum(y, axis=1) == 1, cp.sum(cp.multiply(c_shift / c_scale, y)) <= slack]
    if not p.avail.all():
        constraints.append(cp.sum(cp.multiply((~p.avail).astype(np.float64), y)) == 0)
    problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(l_shift / l_scale, y))), constraints)
    with contextlib.nullcontext() if verbose else without_solver_banner():
        problem.solve(
            solver=cp.HIGHS,
            verbose=verbose,
            time_limit=float(time_limit),
            mip_rel_gap=float(mip_rel_gap),
            mip_abs_gap=mip_abs_gap,
        )
    solver = f"milp-highs[{problem.status}]"
    if y.value is None:  # no incumbent (e.g. time limit before the first one): cross-check answer
        choice, solver = greedy_choice, f"greedy-hull[milp {problem.status}]"
    else:
        choice = _repair(p, np.argmax(np.where(p.avail, y.value, -np.inf), axis=1))
        if _evaluate(p, greedy_choice)[0] < _evaluate(p, choice)[0]:
            # Only possible when HiGHS stopped early; never hand back the worse of the two.
            choice, solver = greedy_choice, solver + "+greedy"
    obj, tot = _evaluate(p, choice)

    lb = lp_value
    info = problem.solver_stats.extra_stats if problem.solver_stats is not None else None
    dual = getattr(info, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        lb = max(lb, float(dual) * l_scale + float(min_loss.sum()))
    lb = min(lb, obj)
    return Allocation(
        choice=choice.astype(np.int64),
        objective=obj,
        total_cost=tot,
        lower_bound=lb,
        gap=_gap(obj, lb),
        solver=solver,
        time_s=time.perf_counter() - t0,
        budget=p.budget,
    )


def allocate(
    loss: np.ndarray,
    cost: np.ndarray,
    budget: float,
    allocator: str = "auto",
    milp_max_units: int = 10_000,
    time_limit: float = 60.0,
) -> Allocation:
    """Dispatch: ``"milp"``, ``"greedy"``, or ``"auto"`` (MILP up to ``milp_max_units`` units)."""
    if allocator not in ("auto", "milp", "greedy"):
        raise ValueError(f"allocator must be 'auto', 'milp' or 'greedy', got {allocator!r}")
    u_count = np.shape(loss)[0]
    if allocator == "milp" or (allocator == "auto" and u_count <= milp_max_units):
        return solve_milp(loss, cost, budget, time_limit=time_limit)
    return solve_greedy(loss, cost, budget)


__all__ = ["Allocation", "BudgetError", "allocate", "solve_greedy", "solve_milp"]
