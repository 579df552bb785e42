"""llama.cpp's K-quant formats (Q2_K … Q6_K) as a baseline, with importance-weighted fitting.

Users compare low-bit MoE quantizers with llama.cpp, and at 2–4 bits its K-quants are what they run.
This module reproduces the *formats* — what is stored, so the effective bits are theirs — and fits
each format's numbers by weighted least squares on importance from our calibration (llama.cpp's
"imatrix": the mean squared input of each contraction index over the tokens routed to the expert,
times ``sqrt(σ² + w²)`` as llama.cpp weighs it, σ² the super-block's mean square).
It is our own implementation of the formats, not a port of llama.cpp's search, so its values are
not bit-identical to llama.cpp's quantizer; the fit below is at least as careful (searched grids,
least-squares refits, scales of scales fitted with the same weights).

Format (one super-block = 256 consecutive weights along the contraction axis, split into
sub-blocks):

| type | code bits | sub-block | per sub-block | per super-block | bytes / 256 | bpw |
|---|---|---|---|---|---|---|
| Q2_K | 2, q ∈ [0, 3] | 16 | 4-bit scale, 4-bit min | fp16 d, fp16 dmin | 84 | 2.625 |
| Q3_K | 3, q ∈ [-4, 3] | 16 | 6-bit signed scale | fp16 d | 110 | 3.4375 |
| Q4_K | 4, q ∈ [0, 15] | 32 | 6-bit scale, 6-bit min | fp16 d, fp16 dmin | 144 | 4.5 |
| Q5_K | 5, q ∈ [0, 31] | 32 | 6-bit scale, 6-bit min | fp16 d, fp16 dmin | 176 | 5.5 |
| Q6_K | 6, q ∈ [-32, 31] | 16 | 8-bit signed scale | fp16 d | 210 | 6.5625 |

Values: ``d·sc·q − dmin·m`` (types with a min: sc, m unsigned, d, dmin ≥ 0, so a sub-block's offset
is ≤ 0) or ``d·sc·q`` (signed sc and q).

Fit, per super-block, with importance ``w ≥ 0`` per weight:

1. each sub-block's real scale (and offset) minimizing ``Σ w (x − x̂)²``: integer grids from a
   range of candidate inverse scales around the one that maps the sub-block's extreme onto the
   grid's end, each refitted by least squares given its codes (two parameters with a min, offset
   kept ≤ 0; one without), the best kept;
2. the sub-block scales (and mins) as integers times one fp16 factor, fitted the same way with
   each sub-block weighted by how much its output moves with its scale (``Σ w q²``) or offset
   (``Σ w``);
3. the codes again, nearest on the stored scales and offsets.

Contraction lengths must be multiples of 256 (llama.cpp stores other tensors in other types).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.baselines.gptq import expert_inputs

SUPER_BLOCK = 256
# Candidate inverse scales: the extreme of a block lands on the grid's end shifted by these steps.
_SHIFTS = tuple(float(s) for s in np.linspace(-1.0, 1.0, 21))
# Super-blocks quantized per jitted call: bounds the candidate search's intermediates (42 candidate
# grids of every weight).
_CHUNK = 4096
# Alternations of nearest codes and least-squares grid per candidate (the affine fit).
_REFITS = 2


@dataclasses.dataclass(frozen=True)
class KQuantType:
    """One K-quant format: code bits, sub-block size, bits per sub-block scale (and min)."""

    name: str
    bits: int
    sub_block: int
    scale_bits: int
    with_min: bool

    @property
    def bytes_per_super_block(self) -> int:
        subs = SUPER_BLOCK // self.sub_block
        per_sub = self.scale_bits * (2 if self.with_min else 1)
        fp16 = 2 if self.with_min else 1
        return (SUPER_BLOCK * self.bits + subs * per_sub + 16 * fp16) // 8

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes_per_super_block / SUPER_BLOCK

    @property
    def code_range(self) -> tuple[int, int]:
        return (
            (0, 2**self.bits - 1)
            if self.with_min
            else (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)
        )

    @property
    def scale_range(self) -> tuple[int, int]:
        return (
            (0, 2**self.scale_bits - 1)
            if self.with_min
            else (-(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1)
        )


K_TYPES = (
    KQuantType("Q2_K", 2, 16, 4, True),
    KQuantType("Q3_K", 3, 16, 6, False),
    KQuantType("Q4_K", 4, 32, 6, True),
    KQuantType("Q5_K", 5, 32, 6, True),
    KQuantType("Q6_K", 6, 16, 8, False),
)


def k_type(name: str) -> KQuantType:
    for t in K_TYPES:
        if t.name == name:
            return t
    raise ValueError(f"unknown K-quant type {name!r}; choose {', '.join(t.name for t in K_TYPES)}")


def type_for_target(target: float) -> KQuantType:
    """The smallest type with at least `target` bpw (the largest if none): the baseline is never
    given fewer bits than the budget it is compared at."""
    for t in K_TYPES:
        if t.bpw >= target - 1e-9:
            return t
    return K_TYPES[-1]


# ------------------------------------------------------------------------------------ the fit
def _fit_scale(x: jax.Array, w: jax.Array, lo: int, hi: int) -> tuple[jax.Array, jax.Array]:
    """(scale [...], codes [..., n]) of ``x ≈ scale · q``, q integer in [lo, hi], minimizing Σ w (x
    − s q)².

    Candidates put the element of largest magnitude on either end of the grid (shifted by
    `_SHIFTS` steps); each candidate's codes get their least-squares scale; the best is kept. With
    ``lo = 0`` and ``x ≥ 0`` the scale is ≥ 0.
    """
    m = jnp.take_along_axis(
        x, jnp.argmax(jnp.abs(x), axis=-1)[..., None], axis=-1
    )  # [..., 1] signed extreme
    ends = jnp.asarray([lo, hi], jnp.float32)
    shifts = jnp.asarray(_SHIFTS, jnp.float32)
    level = ends[:, None] + jnp.sign(ends)[:, None] * shifts[None, :]  # [2, S]
    # A negative inverse scale is allowed: signed grids are asymmetric ([-4, 3]), so a positive
    # extreme may best sit on the negative end, with a negative scale.
    inv = level.reshape(-1) / jnp.where(m == 0, 1.0, m)  # [..., C]
    q = jnp.clip(jnp.round(x[..., None, :] * inv[..., :, None]), lo, hi)  # [..., C, n]
    wq = w[..., None, :] * q
    num = jnp.sum(wq * x[..., None, :], -1)
    den = jnp.sum(wq * q, -1)
    s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    err = jnp.sum(w[..., None, :] * (x[..., None, :] - s[..., None] * q) ** 2, -1)
    best = jnp.argmin(err, axis=-1)
    return jnp.take_along_axis(s, best[..., None], -1)[..., 0], jnp.take_along_axis(
        q, best[..., None, None], -2
    )[..., 0, :]


def _nearest(x: jax.Array, scale: jax.Array, offset: jax.Array, lo: int, hi: int) -> jax.Array:
    """Codes of ``x [..., n]`` nearest on the grid ``scale · q + offset`` (per row), q in [lo, hi];
    a zero scale divides by 1."""
    return jnp.clip(
        jnp.round((x - offset[..., None]) / jnp.where(scale == 0, 1.0, scale)[..., None]), lo, hi
    )


def _affine_lsq(xs: jax.Array, ws: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Least-squares (scale ≥ 0, offset ≤ 0) of ``xs ≈ scale · q + offset`` for fixed codes, per
    row."""
    sw, sq, sqq = jnp.sum(ws, -1), jnp.sum(ws * q, -1), jnp.sum(ws * q * q, -1)
    sx, sqx = jnp.sum(ws * xs, -1), jnp.sum(ws * q * xs, -1)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * jnp.maximum(sw * sqq, 1e-30)
    safe = jnp.where(ok, det, 1.0)
    s = jnp.where(ok, (sw * sqx - sq * sx) / safe, 0.0)
    o = jnp.where(ok, (sqq * sx - sq * sqx) / safe, sx / jnp.maximum(sw, 1e-30))
    # The format's offset is −dmin·m with dmin, m ≥ 0: refit the scale alone at offset 0 if needed.
    pos = o > 0
    s = jnp.where(pos, jnp.where(sqq > 0, sqx / jnp.where(sqq > 0, sqq, 1.0), 0.0), s)
    o = jnp.where(pos, 0.0, o)
    neg = s < 0  # codes anti-correlated with x: no scale helps, keep the (clipped) mean
    o = jnp.where(neg, jnp.minimum(sx / jnp.maximum(sw, 1e-30), 0.0), o)
    return jnp.where(neg, 0.0, s), o


def _fit_affine(x: jax.Array, w: jax.Array, hi: int) -> tuple[jax.Array, jax.Array]:
    """(scale ≥ 0, offset ≤ 0) per row of ``x ≈ scale · q + offset``, q in [0, hi], minimizing Σ w
    (x − x̂)²."""
    lo_v = jnp.minimum(jnp.min(x, -1, keepdims=True), 0.0)
    span = jnp.max(x, -1, keepdims=True) - lo_v
    shifts = jnp.asarray(_SHIFTS, jnp.float32)
    inv = jnp.where(span > 0, (hi + shifts) / jnp.where(span > 0, span, 1.0), 0.0)  # [..., S]
    # Grids anchored at the low end (an outlier at the top may be clipped) and at the top (one at
    # the bottom may be).
    from_lo = jnp.round((x - lo_v)[..., None, :] * inv[..., :, None])
    from_hi = hi - jnp.round((lo_v + span - x)[..., None, :] * inv[..., :, None])
    q = jnp.clip(jnp.concatenate([from_lo, from_hi], axis=-2), 0, hi)  # [..., 2S, n]
    xs, ws = x[..., None, :], w[..., None, :]
    s, o = _affine_lsq(xs, ws, q)
    for _ in range(_REFITS):  # codes again on the refitted grid, then the grid again on the codes
        q = _nearest(xs, s, o, 0, hi)  # s ≥ 0
        s, o = _affine_lsq(xs, ws, q)
    err = jnp.sum(ws * (xs - (s[..., None] * q + o[..., None])) ** 2, -1)
    best = jnp.argmin(err, axis=-1)[..., None]
    return jnp.take_along_axis(s, best, -1)[..., 0], jnp.take_along_axis(o, best, -1)[..., 0]


def _fp16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float16).astype(jnp.float32)


def _stored_factor(
    v: jax.Array, importance: jax.Array, lo: int, hi: int
) -> tuple[jax.Array, jax.Array]:
    """One fp16 factor per row and integers in [lo, hi] for the values ``v [..., subs]``."""
    d, _ = _fit_scale(v, importance, lo, hi)
    d = _fp16(d)
    ints = jnp.clip(jnp.round(v / jnp.where(d == 0, 1.0, d)[..., None]), lo, hi)
    return d, jnp.where(d[..., None] == 0, 0.0, ints)


@functools.partial(jax.jit, static_argnames=("kt",))
def _quantize_super_blocks(x: jax.Array, w: jax.Array, kt: KQuantType) -> dict[str, jax.Array]:
    """The stored fields and the reconstruction of super-blocks ``x [M, 256]`` with importance
    ``w``."""
    m = x.shape[0]
    subs = SUPER_BLOCK // kt.sub_block
    xs = x.reshape(m, subs, kt.sub_block)
    ws = w.reshape(m, subs, kt.sub_block)
    # A sub-block without importance (inputs never active) is fitted unweighted.
    ws = jnp.where(jnp.sum(ws, -1, keepdims=True) > 0, ws, 1.0)
    qlo, qhi = kt.code_range
    slo, shi = kt.scale_range
    if kt.with_min:
        s, o = _fit_affine(xs, ws, qhi)
        q_est = _nearest(xs, s, o, 0, qhi)
        d, sc = _stored_factor(s, jnp.sum(ws * q_est * q_est, -1), slo, shi)
        dmin, mc = _stored_factor(-o, jnp.sum(ws, -1), slo, shi)
        scale, offset = d[:, None] * sc, -dmin[:, None] * mc
    else:
        s, q_est = _fit_scale(xs, ws, qlo, qhi)
        d, sc = _stored_factor(s, jnp.sum(ws * q_est * q_est, -1), slo, shi)
        dmin, mc = jnp.zeros_like(d), jnp.zeros_like(sc)
        scale, offset = d[:, None] * sc, jnp.zeros_like(sc)
    q = jnp.where(scale[..., None] == 0, 0.0, _nearest(xs, scale, offset, qlo, qhi))
    deq = scale[..., None] * q + offset[..., None]
    return {
        "d": d,
        "dmin": dmin,
        "sc": sc,
        "m": mc,
        "q": q.reshape(m, SUPER_BLOCK),
        "values": deq.reshape(m, SUPER_BLOCK),
    }


def quantize_rows(x: Any, importance: Any, kt: KQuantType) -> dict[str, np.ndarray]:
    """K-quantize rows ``x [R, K]`` (K a multiple of 256) with per-weight importance ``[R, K]`` (or
    broadcastable). Returns numpy fields per super-block (``d``, ``dmin`` [R·K/256]; ``sc``, ``m``
    [R·K/256, subs]; ``q`` and the reconstruction ``values`` [R, K])."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] % SUPER_BLOCK:
        raise ValueError(
            f"{kt.name} needs rows whose length is a multiple of {SUPER_BLOCK}, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{kt.name}: the weights to quantize contain NaN or inf")
    w = np.broadcast_to(np.asarray(importance, np.float32), x.shape)
    xb, wb = x.reshape(-1, SUPER_BLOCK), w.reshape(-1, SUPER_BLOCK)
    parts = []
    for lo in range(0, xb.shape[0], _CHUNK):
        n = min(_CHUNK, xb.shape[0] - lo)
        # Pad every chunk to one size: one compiled program per type, not one per remainder.
        pad = ((0, _CHUNK - n), (0, 0)) if xb.shape[0] > _CHUNK else ((0, 0), (0, 0))
        out = _quantize_super_blocks(
            jnp.asarray(np.pad(xb[lo : lo + n], pad)), jnp.asarray(np.pad(wb[lo : lo + n], pad)), kt
        )
        parts.append({k: np.asarray(v)[:n] for k, v in out.items()})
    fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not np.isfinite(fields["values"]).all():  # the fp16 factors hold at most 65504
        raise ValueError(
            f"{kt.name}: weights up to |{np.abs(x).max():.3g}| overflow the format's fp16 scale "
            "factors"
        )
    fields["q"] = fields["q"].reshape(x.shape)
    fields["values"] = fields["values"].reshape(x.shape)
    return fields


def kquantize(
    w: Any, importance: Any, kt: KQuantType, axis: int, magnitude: bool = True
) -> np.ndarray:
    """Fake-quantize ``w`` with super-blocks along `axis` (the contraction axis); ``importance``
    has one entry per index of that axis (1-D) or one per weight.

    ``magnitude`` (llama.cpp's weighting with an imatrix): each weight's importance is multiplied by
    ``sqrt(σ² + w²)``, σ² the mean square of its super-block, so large weights are fitted more
    closely. On the reference model it lowers Q2_K's KL by a third (0.022 → 0.015) against the
    imatrix alone; ``False`` uses the importance as given."""
    w = np.asarray(w, np.float32)
    imp = np.asarray(importance, np.float32)
    if imp.ndim == 1:
        if imp.shape[0] != w.shape[axis]:
            raise ValueError(
                f"importance has {imp.shape[0]} entries for a contraction axis of {w.shape[axis]}"
            )
        shape = [1] * w.ndim
        shape[axis] = -1
        imp = imp.reshape(shape)
    rows = np.moveaxis(w, axis, -1)
    flat = rows.reshape(-1, rows.shape[-1])
    imp_rows = np.moveaxis(np.broadcast_to(imp, w.shape), axis, -1).reshape(flat.shape)
    if magnitude and flat.shape[1] % SUPER_BLOCK == 0:
        blocks = flat.reshape(flat.shape[0], -1, SUPER_BLOCK)
        sigma2 = np.mean(blocks * blocks, axis=-1, keepdims=True)
        imp_rows = imp_rows * np.sqrt(sigma2 + blocks * blocks).reshape(flat.shape)
    out = quantize_rows(flat, imp_rows, kt)["values"]
    return np.moveaxis(out.reshape(rows.shape), -1, axis)


def check_contractions(hidden: int, inter: int) -> None:
    """Raise if the experts' contraction lengths (D for gate/up, F for down) are not whole
    super-blocks."""
    if hidden % SUPER_BLOCK or inter % SUPER_BLOCK:
        raise ValueError(
            f"K-quants need expert contraction lengths that are multiples of {SUPER_BLOCK}; this "
            "model has "
            f"hidden_size={hidden}, moe_intermediate_size={inter} (llama.cpp stores such tensors "
            "in other types)"
        )


def kquant_experts(
    gate: Any,
    up: Any,
    down: Any,
    x: Any,
    expert_idx: Any,
    expert_w: Any,
    kt: KQuantType,
    min_tokens: int = 16,
) -> dict[str, Any]:
    """K-quantize every routed expert of one MoE layer (gate/up [E, D, F], down [E, F, D]).

    Importance (the imatrix) per expert: the mean square of each input of gate/up (x over the tokens
    routed to the expert) and of down (h = silu(x gate) · (x up) of the unquantized expert), with
    the GPTQ baseline's starved-expert fallback (every token), times each weight's magnitude factor
    (`kquantize`). Returns dict(gate, up, down, starved, bpw).
    """

    gate, up, down = (np.asarray(a, np.float32) for a in (gate, up, down))
    check_contractions(gate.shape[1], gate.shape[2])
    out = {"gate": np.empty_like(gate), "up": np.empty_like(up), "down": np.empty_like(down)}
    starved = []
    for e, xe, he, routed in expert_inputs(
        x, expert_idx, expert_w, gate, up, gate.shape[0], min_tokens
    ):
        if routed < min_tokens:
            starved.append(e)
        imp_in = np.asarray(jnp.mean(xe * xe, axis=0))
        imp_h = np.asarray(jnp.mean(he * he, axis=0))
        out["gate"][e] = kquantize(gate[e], imp_in, kt, axis=0)
        out["up"][e] = kquantize(up[e], imp_in, kt, axis=0)
        out["down"][e] = kquantize(down[e], imp_h, kt, axis=0)
    return {**out, "starved": starved, "bpw": kt.bpw}


__all__ = [
    "K_TYPES",
    "KQuantType",
    "SUPER_BLOCK",
    "check_contractions",
    "k_type",
    "kquant_experts",
    "kquantize",
    "quantize_rows",
    "type_for_target",
]
