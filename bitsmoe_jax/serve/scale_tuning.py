"""End-to-end tuning of a quantized model's stored scales, with every integer code fixed.

Why: rounding picks the codes well (error feedback), but each group scale is then chosen alone, for
its own group's weighted error. The numbers that go with the codes — the factors' bf16 group
scales and the bases' per-row scales — can instead be fitted jointly to what matters: the
quantized model's next-token distribution against the unquantized one's. Only floats that are
already stored change, at their stored dtype and shape, so the format and every counted bit stay
as they are.

How: each scale s becomes s₀·exp(θ) (θ = 0 is the untuned model; a multiplicative step treats
scales of every magnitude alike), θ is fitted by Adam to KL(unquantized ‖ quantized) of the logits
on calibration windows, and a held-out part of the windows stops it early: the θ with the lowest
held-out KL is kept, rounded to bf16, and kept only if the rounded scales still beat the untuned
ones on the held-out windows (never worse than untuned there, by construction).

Both models are held in memory, so this suits models whose unquantized weights fit the host.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitsmoe_jax.serve.quantized_experts import Packed


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    eval_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.eval_every < 1 or self.lr < 0:
            raise ValueError(
                f"tuning needs steps >= 0, lr >= 0, batch_size >= 1 and eval_every >= 1, got {self}"
            )


def is_stored_scale(path: tuple, value: Any) -> bool:
    """The tuned floats: quantized experts' factor group scales and basis row scales."""
    return isinstance(value, Packed) and ("scales" in path or path[-1] == "scale")


def kl_to_teacher(logits: jax.Array, teacher_logp: jax.Array) -> jax.Array:
    """Mean over tokens of KL(teacher ‖ student), nats."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1))


@dataclasses.dataclass
class TuneResult:
    holdout_kl_before: float
    holdout_kl_after: float  # with the scales as written (bf16)
    kept: bool  # False: the tuned scales did not beat the untuned ones, which stay
    best_step: int
    steps_run: int
    seconds: float
    tuned_scalars: int
    history: list[dict[str, float]]


def calibration_windows(
    tokens: np.ndarray, seq_len: int, count: int, holdout_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(training windows, held-out windows) [n, seq_len]: up to `count` non-overlapping windows of
    the token stream in a seeded random order, `holdout_fraction` of them (at least one) held
    out."""
    n = len(tokens) // seq_len
    if n < 2:
        raise ValueError(
            f"the tuning text has {len(tokens)} tokens: two windows of {seq_len} are needed"
        )
    order = np.random.default_rng(seed).permutation(n)[: min(count, n)]
    wins = np.stack([tokens[i * seq_len : (i + 1) * seq_len] for i in order]).astype(np.int32)
    held = min(len(wins) - 1, max(1, round(len(wins) * holdout_fraction)))
    return wins[held:], wins[:held]


def tune_scales(
    model: nnx.Module,
    reference: nnx.Module,
    windows: np.ndarray,
    holdout: np.ndarray,
    cfg: TuneConfig,
    log: Callable[[str], None] = lambda s: None,
) -> TuneResult:
    """Fit `model`'s stored scales (in place) to `reference` on token windows [n, T]; `holdout`
    [m, T] decides when to stop and whether to keep the result."""
    graphdef, scales, rest = nnx.split(model, is_stored_scale, ...)
    leaves = jax.tree.leaves(scales)
    if not leaves:
        raise ValueError("the model has no quantized experts: nothing to tune")
    dtypes = jax.tree.map(lambda a: a.dtype, scales)
    s0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), scales)
    theta0 = jax.tree.map(jnp.zeros_like, s0)

    # Every array reaches the compiled functions as an argument, never through a closure: a
    # closed-over array is embedded in the program as a constant, and these close over whole
    # models (the reference's weights, the quantized model's packed factors). Only the graph
    # definitions, dtypes and the optimizer (static Python objects) are closed over.
    ref_graphdef, ref_state = nnx.split(reference)

    def scaled(s0, theta, stored: bool):
        out = jax.tree.map(lambda a, t: a * jnp.exp(t), s0, theta)
        if stored:  # as written: rounded to the stored dtype
            out = jax.tree.map(lambda a, d: a.astype(d).astype(jnp.float32), out, dtypes)
        return out

    def student_logits(s0, rest, theta, ids, stored=False):
        return nnx.merge(graphdef, scaled(s0, theta, stored), rest)(ids)

    @jax.jit
    def teacher_logp(state, ids):
        logits = nnx.merge(ref_graphdef, state)(ids)
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    def teacher(ids):
        return teacher_logp(ref_state, ids)

    hold_teacher = [
        teacher(jnp.asarray(holdout[i : i + cfg.batch_size]))
        for i in range(0, len(holdout), cfg.batch_size)
    ]

    @functools.partial(jax.jit, static_argnames="stored")
    def batch_kl(theta, s0, rest, ids, tlp, stored):
        return kl_to_teacher(student_logits(s0, rest, theta, ids, stored), tlp)

    def holdout_kl(theta, stored: bool) -> float:
        total = 0.0
        for j, i in enumerate(range(0, len(holdout), cfg.batch_size)):
            ids = jnp.asarray(holdout[i : i + cfg.batch_size])
            kl = batch_kl(theta, s0, rest, ids, hold_teacher[j], stored=stored)
            total += float(kl) * len(ids)
        return total / len(holdout)

    opt = optax.adam(cfg.lr)

    @jax.jit
    def step(theta, state, s0, rest, ids, tlp):
        def loss_fn(t):
            return kl_to_teacher(student_logits(s0, rest, t, ids), tlp)

        loss, grad = jax.value_and_grad(loss_fn)(theta)
        updates, state = opt.update(grad, state, theta)
        return optax.apply_updates(theta, updates), state, loss

    t0 = time.time()
    before = holdout_kl(theta0, stored=True)
    log(f"tuning {sum(a.size for a in leaves):,} stored scales; held-out KL {before:.6f}")
    best, best_theta, best_step = holdout_kl(theta0, stored=False), theta0, 0
    history: list[dict[str, float]] = []
    theta, state = theta0, opt.init(theta0)
    rng = np.random.default_rng(cfg.seed)
    batch = min(cfg.batch_size, len(windows))
    for k in range(1, cfg.steps + 1):
        idx = rng.choice(len(windows), batch, replace=False)
        ids = jnp.asarray(windows[idx])
        theta, state, loss = step(theta, state, s0, rest, ids, teacher(ids))
        if k % cfg.eval_every == 0 or k == cfg.steps:
            h = holdout_kl(theta, stored=False)
            history.append({"step": k, "train_kl": float(loss), "holdout_kl": h})
            log(f"  step {k}/{cfg.steps}: batch KL {float(loss):.6f}, held-out KL {h:.6f}")
            if h < best:
                best, best_theta, best_step = h, theta, k
    after = holdout_kl(best_theta, stored=True)
    kept = after < before
    final = best_theta if kept else theta0
    nnx.update(
        model,
        jax.tree.map(lambda a, d: a.astype(d), scaled(s0, final, stored=False), dtypes),
    )
    result = TuneResult(
        holdout_kl_before=before,
        holdout_kl_after=after if kept else before,
        kept=kept,
        best_step=best_step if kept else 0,
        steps_run=cfg.steps,
        seconds=time.time() - t0,
        tuned_scalars=int(sum(a.size for a in leaves)),
        history=history,
    )
    log(
        f"held-out KL {before:.6f} -> {result.holdout_kl_after:.6f} "
        + (f"(step {best_step} kept)" if kept else "(no gain: the untuned scales are kept)")
        + f" in {result.seconds:.1f} s"
    )
    return result
