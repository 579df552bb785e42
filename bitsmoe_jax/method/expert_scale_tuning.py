"""Each expert's stored factor scales fitted to its output error, with every integer code fixed.

Why: rounding chooses the codes well (error feedback), but each group scale is then picked alone,
for its own group's weighted error. With the codes fixed, a factor value is (2·code + 1)·s, linear
in its group's scale s, so the scales can be fitted jointly to what the layer computes: the
expert's output on the calibration tokens routed to it, each weighted by its squared routing weight
— the allocation's loss — against the same expert with its unquantized factors (all components,
the dequantized bases that the factors were fitted to). Only bf16 scales that are stored anyway
change, so the format and every counted bit stay as they are.

How: each scale is s₀·exp(θ) (θ = 0 is the untuned expert), Adam on θ over the expert's
training tokens (a batch of them per step, `token_batches`), one block of calibration tokens in
ten held out (`holdout_mask`) and measured whole every step; the θ with the
lowest held-out error is rounded to bf16 and kept only if the rounded scales beat the untuned ones
on the held-out tokens. Every expert is fitted on its own from its own inputs, so the result does
not depend on the chunk, the mesh or the process that computes it (byte-identical outputs), and
the memory is one expert's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.error_feedback import CalibrationInputs, hidden_glu
from bitsmoe_jax.method.shape_buckets import geometric_bucket, power_of_two
from bitsmoe_jax.models.moe import ExpertFn, GluActivation

HI = jax.lax.Precision.HIGHEST
#: one block of calibration tokens in `HOLDOUT_EVERY` is held out; blocks of `HOLDOUT_BLOCK`
#: tokens, fewer when the calibration is short (so that at least two blocks are held out)
HOLDOUT_BLOCK = 128
HOLDOUT_EVERY = 10


@dataclasses.dataclass(frozen=True)
class ScaleTuning:
    """Adam steps, learning rate (on log-scales) and training tokens per step of the per-expert
    scale fit."""

    steps: int
    lr: float
    batch_tokens: int = 0  # training tokens per step (0: all of the expert's)

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lr > 0 or self.batch_tokens < 0:
            raise ValueError(
                f"scale tuning needs steps >= 1, lr > 0 and batch_tokens >= 0, got {self}"
            )


def holdout_mask(num_tokens: int) -> np.ndarray:
    """True for the held-out calibration tokens: the last of every `HOLDOUT_EVERY` blocks."""
    block = max(1, min(HOLDOUT_BLOCK, num_tokens // (2 * HOLDOUT_EVERY)))
    return (np.arange(num_tokens) // block) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def _factors(scales, mult, fixed, group_size: int):
    """Each projection's kept rows [k, F] of an expert: fixed values (16-bit units) plus
    mult·scale (packed units; mult = 2·code + 1, zero for the others)."""
    out = {}
    for p in PROJECTIONS:
        f = mult[p].shape[-1]
        s_full = jnp.repeat(scales[p], min(group_size, f), axis=-1)[:, :f]
        out[p] = fixed[p] + mult[p] * s_full
    return out


@functools.partial(jax.jit, static_argnames=("steps", "lr", "group_size", "act"))
def _fit(
    s0, mult, fixed, rows, ref, train, nb, hold, bg, bu, gram, *, steps, lr, group_size, act,
):  # fmt: skip
    """(scales to store, held-out error untuned, held-out error stored) of one expert.

    train = (zg [B, b, r], zu [B, b, r], w [B, b]): the training tokens in nb ≤ B batches (the
    rest padding), step s on batch s mod nb; hold = (zg [h, r], zu [h, r], w [h]): the held-out
    tokens, measured every step. The error of a token is ‖(a − a_ref)·Ũᵀ‖², a = h·B_downᵀ in the
    down basis's coordinates (`gram` = ŨᵀŨ); the quantized expert computes on its kept
    components only (the dropped ones are zero), the reference on all of them."""

    def reference(zg, zu):
        g = hidden_glu(zg, zu, ref["gate"], ref["up"], bg, bu, act)
        return jnp.matmul(g, ref["down"].T, precision=HI)

    def errors(scales, zg, zu, a_ref):
        f = _factors(scales, mult, fixed, group_size)
        h = hidden_glu(zg[:, rows["gate"]], zu[:, rows["up"]], f["gate"], f["up"], bg, bu, act)
        a = (
            jnp.zeros_like(a_ref)
            .at[:, rows["down"]]
            .set(jnp.matmul(h, f["down"].T, precision=HI), mode="drop")
        )
        d = a - a_ref
        return jnp.sum(jnp.matmul(d, gram, precision=HI) * d, axis=-1)

    tz_g, tz_u, tw = train
    hz_g, hz_u, hw = hold
    t_ref = jax.vmap(reference)(tz_g, tz_u)
    h_ref = reference(hz_g, hz_u)

    def held_out(scales):
        return jnp.sum(hw * errors(scales, hz_g, hz_u, h_ref))

    def losses(theta, i):
        scales = jax.tree.map(lambda s, t: s * jnp.exp(t), s0, theta)
        e = errors(scales, tz_g[i], tz_u[i], t_ref[i])
        return jnp.sum(tw[i] * e), held_out(scales)

    opt = optax.adam(lr)

    def step(carry, s):
        theta, state, best, best_hold = carry
        (_, hold_err), grad = jax.value_and_grad(losses, has_aux=True)(theta, s % nb)
        better = hold_err < best_hold
        best = jax.tree.map(lambda b, t: jnp.where(better, t, b), best, theta)
        best_hold = jnp.where(better, hold_err, best_hold)
        updates, state = opt.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state, best, best_hold), None

    theta0 = jax.tree.map(jnp.zeros_like, s0)
    carry = (theta0, opt.init(theta0), theta0, jnp.asarray(jnp.inf, jnp.float32))
    (_, _, best, _), _ = jax.lax.scan(step, carry, jnp.arange(steps))
    stored = jax.tree.map(
        lambda s, t: (s * jnp.exp(t)).astype(jnp.bfloat16).astype(jnp.float32), s0, best
    )
    return stored, held_out(s0), held_out(stored)


def layer_fit_sizes(
    tuning: ScaleTuning, calib: CalibrationInputs, num_experts: int
) -> tuple[int, int]:
    """(training batches, held-out tokens) that every expert's fit of a layer is padded to.

    Why: each shape of the fit's arrays is a compilation (about a second), and the experts'
    token counts give many shapes: padded to the layer's largest, the fits of a layer share one
    program per batch length. Padding batches are never stepped on, padding tokens weigh 0, so
    only the held-out evaluation computes more. Starved experts (fitted on every token) are left
    out of the maxima and keep their own sizes. From the whole layer's routing: the same on
    every mesh and chunk."""
    batches = held = 1
    for e in range(num_experts):
        if calib.starved(e):
            continue
        w2 = calib.token_weights(e)
        hold = holdout_mask(len(w2))[w2 > 0]
        batches = max(batches, _batch_count(int((~hold).sum()), tuning.batch_tokens))
        held = max(held, power_of_two(int(hold.sum())))
    return batches, held


def _batch_count(n: int, batch: int) -> int:
    """Batches `token_batches` deals `n` training tokens into (`batch` 0: one)."""
    return 1 if not batch or n <= batch else geometric_bucket(-(-n // batch))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(a, [(0, max(rows - a.shape[0], 0))] + [(0, 0)] * (a.ndim - 1))


def token_batches(
    rows: np.ndarray, weights: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [nb, b], weights [nb, b]) of the training tokens in batches of at most `batch`
    (0: one batch of all), padded with token 0 at weight 0 to few shapes (the number of batches
    to `geometric_bucket`s, their length to a power of two: each shape is a compilation of the
    fit, which costs more than the padded tokens).
    The tokens are dealt to the batches in turn (batch j: tokens j, j + nb, ...), so every batch
    spans the calibration text; weights are normalised to sum to 1 per batch on average."""
    n = max(int(rows.size), 1)
    nb = _batch_count(n, batch)
    b = power_of_two(-(-n // nb))
    ids = np.zeros((nb, b), np.int64)
    w = np.zeros((nb, b), np.float64)
    for j in range(nb):
        part = slice(j, rows.size, nb)
        k = rows[part].size
        ids[j, :k] = rows[part]
        w[j, :k] = weights[part]
    total = w.sum()
    return ids, (w * (nb / total) if total > 0 else w)


@dataclasses.dataclass
class TuningStats:
    """What the fit did over a layer's experts (for the run's log and report)."""

    experts: int = 0
    kept: int = 0
    holdout_before: float = 0.0  # summed over the experts, routing-weighted
    holdout_after: float = 0.0
    seconds: float = 0.0  # a run timing: not in the report

    def add(self, record: np.ndarray) -> None:
        """Count one expert's `tune_expert_scales` record; add them in expert order, so the sums
        are the same on any mesh."""
        before, after, kept = (float(v) for v in record)
        if np.isnan(before):  # not fitted (nothing packed, or no held-out tokens)
            return
        self.experts += 1
        self.kept += int(kept)
        self.holdout_before += before
        self.holdout_after += after if kept else before

    def to_json(self) -> dict[str, float | int]:
        """The report's record (the time goes to the run's timings)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "seconds"}


#: the record of an expert left untuned
NOT_FITTED = np.full(3, np.nan, np.float32)


def tune_expert_scales(
    tuning: ScaleTuning,
    z: dict[str, jax.Array],
    w2: np.ndarray,
    reference: dict[str, np.ndarray],
    kept: dict[str, np.ndarray],
    bits: dict[str, np.ndarray],
    codes: dict[str, np.ndarray],
    scales: dict[str, np.ndarray],
    values16: dict[str, np.ndarray | None],
    down_gram: np.ndarray,
    group_size: int,
    act: GluActivation,
    bias: tuple[np.ndarray, np.ndarray] | None,
    sizes: tuple[int, int] = (1, 1),
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(One expert's fitted scales {p: [k_p, groups]} (float32, bf16 values), or its `scales`
    unchanged when the fit does not beat them on the held-out tokens; its record for
    `TuningStats.add`: float32 [held-out error before, after, kept], NaN when not fitted).

    z: the calibration tokens through the dequantized gate/up bases [N, r]; w2 [N]: the expert's
    token weights (`CalibrationInputs.token_weights`); reference {p: [r, F]}: its unquantized
    factors, all components; kept {p}: the component rows stored; bits/codes/scales {p}: the kept
    rows' widths [k], codes [k, F] and scales [k, groups]; values16 {p}: the kept rows' values
    (read for 16-bit rows); down_gram: ŨᵀŨ of the dequantized down basis [r, r]; bias: GPT-OSS's
    gate/up biases [F] each; sizes: the layer's (training batches, held-out tokens) to pad to
    (`layer_fit_sizes`; an expert needing more keeps its own).
    """
    routed = np.flatnonzero(w2 > 0)
    if routed.size == 0 or not any(((b >= 1) & (b <= 8)).any() for b in bits.values()):
        return scales, NOT_FITTED
    hold = holdout_mask(len(w2))[routed]
    if hold.all() or not hold.any():  # too few tokens to hold some out: leave it untuned
        return scales, NOT_FITTED
    t_ids, t_w = token_batches(routed[~hold], w2[routed[~hold]], tuning.batch_tokens)
    (h_ids,), (h_w,) = token_batches(routed[hold], w2[routed[hold]], 0)  # one batch, every step
    nb = len(t_ids)
    t_ids, t_w = _pad_rows(t_ids, sizes[0]), _pad_rows(t_w, sizes[0])
    h_ids, h_w = _pad_rows(h_ids, sizes[1]), _pad_rows(h_w, sizes[1])
    f_width = codes["gate"].shape[-1]
    mult, fixed = {}, {}
    for p in PROJECTIONS:
        packed = ((bits[p] >= 1) & (bits[p] <= 8))[:, None]
        mult[p] = np.where(packed, 2.0 * codes[p].astype(np.float32) + 1.0, 0.0).astype(np.float32)
        v16 = values16[p]
        fixed[p] = (
            np.zeros(codes[p].shape, np.float32)
            if v16 is None
            else np.where(
                (bits[p] == 16)[:, None],
                np.asarray(v16, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32),
                0.0,
            )
        )
    bg, bu = (np.zeros(f_width, np.float32),) * 2 if bias is None else bias
    k = {p: len(kept[p]) for p in PROJECTIONS}
    # the kept rows padded to a few counts: one compilation per bucket, not per expert
    s_pad, m_pad, f_pad, r_pad = _padded_kept_rows(
        scales, mult, fixed, kept, len(reference["down"])
    )
    stored, before, after = _fit(
        s_pad,
        m_pad,
        f_pad,
        r_pad,
        {p: jnp.asarray(reference[p], jnp.float32) for p in PROJECTIONS},
        (z["gate"][t_ids], z["up"][t_ids], jnp.asarray(t_w, jnp.float32)),
        jnp.asarray(nb, jnp.int32),
        (z["gate"][h_ids], z["up"][h_ids], jnp.asarray(h_w, jnp.float32)),
        jnp.asarray(bg, jnp.float32),
        jnp.asarray(bu, jnp.float32),
        jnp.asarray(down_gram, jnp.float32),
        steps=tuning.steps,
        lr=tuning.lr,
        group_size=group_size,
        act=act,
    )
    # the record as every process sees it after the all-gather: float32
    record = np.asarray([before, after, 0.0], np.float32)
    if not record[1] < record[0]:
        return scales, record
    record[2] = 1.0
    return {p: np.asarray(stored[p], np.float32)[: k[p]] for p in PROJECTIONS}, record


def _padded_kept_rows(scales, mult, fixed, kept, rank: int) -> tuple[dict, ...]:
    """`_fit`'s per-row inputs {p: ...} with each projection's kept rows padded at the end to a
    `geometric_bucket` of rows: the fit is a compilation per shape, and the kept counts differ from
    expert to expert (a quick run of the shipped model's 48 experts compiled it 20 times, ~0.9 s
    each, 13 times with this; a model with more layers and experts, once per combination of
    counts). A padded row is inert: its factor row is zero (mult and fixed 0, scale 1), so it adds
    exact zeros at the end of each sum over rows and its log-scale's gradient is 0; it reads
    component 0 in the gate/up gathers and writes nowhere in the down scatter (index `rank`,
    dropped). The fitted scales of the real rows are the first rows of the result."""
    out: tuple[dict, dict, dict, dict] = ({}, {}, {}, {})
    for p in PROJECTIONS:
        k = len(kept[p])
        pad = geometric_bucket(k) - k
        s_p = np.asarray(scales[p], np.float32)
        out[0][p] = jnp.asarray(np.pad(s_p, [(0, pad), (0, 0)], constant_values=1.0))
        out[1][p] = jnp.asarray(_pad_rows(mult[p], k + pad))
        out[2][p] = jnp.asarray(_pad_rows(fixed[p], k + pad))
        spare = rank if p == "down" else 0
        out[3][p] = jnp.asarray(
            np.pad(np.asarray(kept[p], np.int32), (0, pad), constant_values=spare)
        )
    return out


def tune_round(
    tuning: ScaleTuning,
    z: dict[str, jax.Array],
    down_gram: np.ndarray,
    calib: CalibrationInputs,
    local: Sequence[int],
    reference: dict[str, np.ndarray],
    keep: dict[str, np.ndarray],
    bits: dict[str, np.ndarray],
    rows: dict[str, dict[str, np.ndarray]],
    group_size: int,
    fn: ExpertFn,
    stats: TuningStats,
    sizes: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """Fit the scales of a round of experts in place: `rows[p]["scales"][j]` of expert
    `local[j]` (its codes `rows[p]["codes"][j]`, its 16-bit values `rows[p]["units"][j]` when
    stored; `reference[p][j]` its unquantized units, all components; `keep[p]` the stored
    components; `bits[p]` [E, r] every expert's widths; `sizes`: `layer_fit_sizes`). Returns the
    experts' records [n, 3]; `stats` gets the seconds."""
    t0 = time.time()
    records = np.zeros((len(local), 3), np.float32)
    for j, e in enumerate(local):
        fitted, records[j] = tune_expert_scales(
            tuning,
            z,
            calib.token_weights(int(e)),
            {p: reference[p][j] for p in PROJECTIONS},
            keep,
            {p: bits[p][e][keep[p]] for p in PROJECTIONS},
            {p: rows[p]["codes"][j] for p in PROJECTIONS},
            {p: rows[p]["scales"][j] for p in PROJECTIONS},
            {p: rows[p]["units"][j] if "units" in rows[p] else None for p in PROJECTIONS},
            down_gram,
            group_size,
            fn.act,
            None if fn.bias is None else (fn.bias["gate"][e], fn.bias["up"][e]),
            sizes,
        )
        for p in PROJECTIONS:
            rows[p]["scales"][j] = fitted[p]
    stats.seconds += time.time() - t0
    return records


def down_basis_gram(ud: np.ndarray | None, rank: int) -> np.ndarray:
    """ŨᵀŨ of the dequantized down basis [D, r] (the identity without a basis): the output error
    measured in the basis's coordinates, computed once a layer."""
    if ud is None:
        return np.eye(rank, dtype=np.float32)
    u = jnp.asarray(ud, jnp.float32)
    return np.asarray(jnp.matmul(u.T, u, precision=HI))


__all__: Sequence[str] = [
    "ScaleTuning",
    "TuningStats",
    "holdout_mask",
    "layer_fit_sizes",
    "tune_expert_scales",
    "tune_round",
    "down_basis_gram",
]
