"""The per-expert scale fit after rounding (`method.expert_scale_tuning`, `scale_tuning_steps`).

Truth: the experts' outputs computed here from the dense weights of the packed block and from the
original expert weights (not from the tuning's own loss), on the held-out calibration tokens; and
the untuned packing, whose codes, permutation and bases the tuned one must keep bit for bit.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.io.checkpoint import load_tree
from bitsmoe_jax.method import streamed
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.expert_scale_tuning import (
    ScaleTuning,
    TuningStats,
    holdout_mask,
    token_batches,
)
from bitsmoe_jax.method.layer_problem import allocate_layers
from bitsmoe_jax.serve.quantized_checkpoint import load_layer_experts, read_meta
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts
from tests.method.random_layer import E, N, build_layer_problem, make_layer, method_params

TUNING = ScaleTuning(steps=40, lr=0.02)


@pytest.fixture(scope="module")
def layer():
    return make_layer()


@pytest.fixture(scope="module")
def packed(layer):
    problem = build_layer_problem(layer, method_params(), None)
    bits, _ = allocate_layers([problem], 2.5, "layer", {"allocator": "greedy"})[0]
    untuned = streamed.round_and_pack(problem, bits)
    stats = TuningStats()
    tuned = streamed.round_and_pack(problem, bits, tuning=TUNING, stats=stats)
    return problem, bits, untuned, tuned, stats


@pytest.fixture(scope="module")
def batched(layer, packed):
    """The same layer fitted on 16 training tokens per step (`scale_tuning_batch`)."""
    problem, bits, *_ = packed
    return streamed.round_and_pack(
        problem, bits, tuning=dataclasses.replace(TUNING, batch_tokens=16)
    )


def test_only_scales_change_and_every_chunk_gives_the_same_bytes(packed):
    problem, bits, (ub, up), (tb, tp), stats = packed
    assert stats.experts == E and stats.kept >= 1
    changed = 0
    for p in PROJECTIONS:
        np.testing.assert_array_equal(tp[p].perm, up[p].perm)
        assert tp[p].seg_bits == up[p].seg_bits
        for a, b in zip(tp[p].payload, up[p].payload, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(tp[p].scales, up[p].scales, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            changed += int((np.asarray(a) != np.asarray(b)).sum())
        for k in ub[p]:
            np.testing.assert_array_equal(tb[p][k], ub[p][k])
    assert changed > 0
    for chunk in (1, 4):
        _, again = streamed.round_and_pack(problem, bits, chunk=chunk, tuning=TUNING)
        for p in PROJECTIONS:
            for a, b in zip(again[p].scales, tp[p].scales, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _held_out_errors(layer, bases, packed_factors) -> np.ndarray:
    """Per expert: Σ over its held-out routed tokens of (routing weight)² · ‖y_q − y‖², y from the
    original expert weights, y_q from the packed block's dense weights."""
    block, x, gate, up, down = layer
    w = QuantizedExperts(E, bases, packed_factors).dense_weights()
    _, weights, idx = block.router(x)
    hold = holdout_mask(N)
    xs = np.asarray(x, np.float64)
    out = np.zeros(E)
    for e in range(E):
        routed = (np.asarray(idx) == e).any(1)
        w2 = np.where(np.asarray(idx) == e, np.asarray(weights), 0.0).sum(1) ** 2
        if routed.sum() < 16:  # starved: every token with one weight (CalibrationInputs)
            w2 = np.ones(N)
        t = hold & (w2 > 0)

        def y(g, u, d, t=t):
            a = xs[t] @ g
            return (a / (1 + np.exp(-a)) * (xs[t] @ u)) @ d

        ref = y(gate[e], up[e], down[e])
        q = y(*(np.asarray(w[k][e], np.float64) for k in ("gate", "up", "down")))
        out[e] = float((w2[t] * ((q - ref) ** 2).sum(1)).sum())
    return out


def test_held_out_error_is_never_above_the_untuned(layer, packed, batched):
    """Fitted on every training token each step, or on 16 of them per step: either way never
    worse on the held-out tokens, and better in sum."""
    _, _, untuned, tuned, _ = packed
    before = _held_out_errors(layer, *untuned)
    for fitted in (tuned, batched):
        after = _held_out_errors(layer, *fitted)
        assert (after <= before * (1 + 1e-4)).all(), (before, after)
        assert after.sum() < 0.97 * before.sum(), (before, after)


def test_token_batches_deal_every_training_token_once():
    rows = np.arange(100, 1100, 3)  # 334 tokens
    weights = np.random.default_rng(0).uniform(0.1, 1.0, rows.size)
    for batch in (0, 16, 100, 334, 1000):
        ids, w = token_batches(rows, weights, batch)
        nb, b = ids.shape
        assert (nb == 1) == (batch == 0 or batch >= rows.size)
        if batch:  # at most `batch` real tokens a step; padding below 1.5× of the tokens
            assert ((w > 0).sum(1) <= batch).all()
        assert nb * b <= 1.5 * 2 * rows.size
        real = w > 0
        assert sorted(ids[real].tolist()) == rows.tolist()  # each once, none invented
        np.testing.assert_allclose(w.sum(), nb)  # one unit of weight per batch on average
        # weights stay proportional to the tokens' own
        order = np.argsort(ids[real])
        np.testing.assert_allclose(w[real][order] / weights, w[real][order][0] / weights[0])
        if nb > 1:  # dealt in turn: every batch spans the whole range of tokens
            assert all(ids[j][w[j] > 0].max() > 900 for j in range(nb))


def test_scale_tuning_fields_are_checked(tmp_path, capsys):
    for field, value, *more in (
        ("scale_tuning_steps", -1),
        ("scale_tuning_lr", 0.0),
        ("scale_tuning_batch", -1),
        # nearest rounding keeps no calibration inputs to fit on: an error, not a silent no-op
        ("scale_tuning_steps", 5, "--config.rounding=nearest"),
    ):
        code = quantize.main(
            ["--config", "configs/tiny.py", f"--config.output_dir={tmp_path / 'o'}",
             f"--config.{field}={value}", *more]
        )  # fmt: skip
        assert code == 2
        err = capsys.readouterr().err
        assert field in err and (not more or "rounding" in err)
        assert not (tmp_path / "o").exists()


def test_quantize_with_scale_tuning_end_to_end(tmp_path):
    """The run's switch: layer 0 (the same calibration inputs in both runs) differs from the
    untuned run in its factor scales only; the report says what the fit did per layer."""
    common = [
        "--config", "configs/tiny.py", "--config.budget_bits=2.0", "--config.eval_text=",
        "--config.num_calib_tokens=2048", "--config.seq_len=128",
    ]  # fmt: skip
    out = {}
    for steps in (0, 10):
        out[steps] = tmp_path / f"s{steps}"
        args = [
            *common,
            f"--config.output_dir={out[steps]}",
            f"--config.scale_tuning_steps={steps}",
        ]
        assert quantize.main(args) == 0
    report = json.loads((out[10] / "report.json").read_text())
    for s in report["layers"].values():
        assert s["scale_tuning"]["experts"] == 16
        assert s["scale_tuning"]["holdout_after"] <= s["scale_tuning"]["holdout_before"]
    assert "scale_tuning" not in json.loads((out[0] / "report.json").read_text())["layers"]["0"]
    assert "scale_tuning" in json.loads((out[10] / "timings.json").read_text())["time_s"]
    a, b = (
        load_layer_experts(
            out[s],
            0,
            load_tree(out[s] / "params" / "layer_000")["experts_q"],
            read_meta(out[s])["layers"]["0"],
        )
        for s in (0, 10)
    )
    flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert flat_a.keys() == flat_b.keys()
    differ = [jax.tree_util.keystr(k) for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])]
    assert differ and all("'scales'" in k for k in differ), differ


def test_padded_kept_rows_fit_as_the_unpadded():
    """Kept-row counts padded to a bucket (one compilation per bucket, not per expert) give the
    fit of the rows as they are: the same stored scales of the real rows, the same held-out
    errors. A padded down row that wrote into component 0, or a padded row that moved, would not."""
    from bitsmoe_jax.method.expert_scale_tuning import _fit, _padded_kept_rows
    from bitsmoe_jax.models.moe import GluActivation

    rng = np.random.default_rng(0)
    r, f, gs, b, h = 12, 16, 8, 32, 16
    kept = {"gate": np.array([0, 2, 3, 5, 9]), "up": np.array([1, 4, 7]),
            "down": np.array([0, 1, 2, 4, 6, 8, 11])}  # fmt: skip
    codes = {p: rng.integers(-2, 2, (len(k), f)) for p, k in kept.items()}
    mult = {p: (2.0 * c + 1.0).astype(np.float32) for p, c in codes.items()}
    fixed = {p: np.zeros(c.shape, np.float32) for p, c in codes.items()}
    scales = {p: rng.uniform(0.05, 0.2, (len(k), f // gs)).astype(np.float32)
              for p, k in kept.items()}  # fmt: skip
    ref = {p: rng.normal(0, 0.3, (r, f)).astype(np.float32) for p in PROJECTIONS}
    z = lambda *s: rng.normal(0, 1, s).astype(np.float32)  # noqa: E731
    train = (z(1, b, r), z(1, b, r), rng.uniform(0, 1, (1, b)).astype(np.float32))
    hold = (z(h, r), z(h, r), rng.uniform(0, 1, h).astype(np.float32))
    gram = np.eye(r, dtype=np.float32) + 0.1
    rest = (ref, train, np.int32(1), hold, np.zeros(f, np.float32), np.zeros(f, np.float32), gram)
    kw = dict(steps=20, lr=0.05, group_size=gs, act=GluActivation())
    want = _fit(scales, mult, fixed, {p: k.astype(np.int32) for p, k in kept.items()}, *rest, **kw)
    padded = _padded_kept_rows(scales, mult, fixed, kept, r)
    assert {p: len(v) for p, v in padded[3].items()} == {"gate": 6, "up": 3, "down": 8}
    got = _fit(*padded, *rest, **kw)
    for p in PROJECTIONS:
        np.testing.assert_allclose(np.asarray(got[0][p])[: len(kept[p])], want[0][p], rtol=1e-6)
    np.testing.assert_allclose([got[1], got[2]], [want[1], want[2]], rtol=1e-6)
    assert float(want[2]) < float(want[1])  # the fit did something
