"""`python -m bitsmoe_jax.tune`: the stored scales of a quantized checkpoint fitted end to end.

References independent of the tuner: the held-out KL recomputed here in numpy from the logits of
the unquantized model and of the written checkpoint loaded back; the files compared array by array
with the untuned checkpoint's (every code, permutation, allocation and dense array byte-identical,
the scales of the same dtype and shape); the stored bits recounted on both loaded models.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bitsmoe_jax import quantize, tune
from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.checkpoint import load_tree
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.serve.quantized_checkpoint import load_quantized
from bitsmoe_jax.serve.scale_tuning import calibration_windows

SEQ = 128
TUNE_ARGS = ["--windows", "48", "--steps", "30", "--batch-size", "4", "--eval-every", "10"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "q"
    code = quantize.main(
        [
            "--config",
            "configs/tiny.py",
            f"--config.output_dir={out}",
            "--config.budget_bits=2.0",
            "--config.num_calib_tokens=2048",
            f"--config.seq_len={SEQ}",
            "--config.eval_text=",
            # the post-pass tunes what the run did not: without the in-run scale fit
            "--config.scale_tuning_steps=0",
            # one pass (per-layer budgets): the tuner reads the written files whatever the scope
            "--config.budget_scope=layer",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tuned(quantized):
    out = quantized.parent / "tuned"
    assert tune.main(["--model", str(quantized), "--out", str(out), *TUNE_ARGS]) == 0
    return out


def _parts(root: Path) -> dict[str, dict]:
    """Every stored item of a quantized checkpoint by name: the orbax items and the groups of
    experts (`io.arrayfile` files)."""
    out = {}
    for item in sorted((root / "params").iterdir()):
        if item.name.endswith("_experts"):
            for g in sorted(item.glob("group_*.json")):
                out[f"{item.name}/{g.stem}"] = arrayfile.load(item, g.stem)[0]
        else:
            out[item.name] = load_tree(item)
    return out


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _holdout_kl(model_dir, windows) -> float:
    ref, _ = load_model(REFERENCE_DIR)
    model, _ = load_model(model_dir)
    p = np.asarray(jax.nn.log_softmax(np.asarray(jit_logits(ref)(windows)), -1), np.float64)
    q = np.asarray(jax.nn.log_softmax(np.asarray(jit_logits(model)(windows)), -1), np.float64)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


def test_only_scales_change(quantized, tuned):
    changed = 0
    before, after = _parts(quantized), _parts(tuned)
    assert before.keys() == after.keys()
    for part in before:
        a, b = _leaves(before[part]), _leaves(after[part])
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert v.dtype == b[k].dtype and v.shape == b[k].shape, k
            same = np.array_equal(v.view(np.uint8), b[k].view(np.uint8))
            is_scale = "['scales']" in k or k.endswith("['scale']")
            assert same or is_scale, f"{part} {k} changed"
            changed += not same
    assert changed > 0  # the tuner did something on this model


def test_bits_are_unchanged(quantized, tuned):
    m0, _ = load_quantized(quantized, backend="xla")
    m1, config = load_quantized(tuned, backend="xla")
    for i in config.moe_layers:
        assert m0.layers[i].mlp.experts.stored_bits() == m1.layers[i].mlp.experts.stored_bits()
    r0 = json.loads((quantized / "report.json").read_text())
    r1 = json.loads((tuned / "report.json").read_text())
    assert r1["effective_bpw_experts"] == r0["effective_bpw_experts"]
    assert r1["tuning"]["kept"] and r1["tuning"]["steps_run"] == 30


def test_held_out_kl_is_not_worse_and_is_reported_truly(quantized, tuned):
    report = json.loads((tuned / "report.json").read_text())["tuning"]
    tokens = tokenize_text(load_tokenizer(REFERENCE_DIR), read_text("shakespeare_train"))
    _, holdout = calibration_windows(tokens, SEQ, 48, 0.1, 0)
    before, after = _holdout_kl(quantized, holdout), _holdout_kl(tuned, holdout)
    assert after < before
    assert report["holdout_kl_before"] == pytest.approx(before, rel=1e-4)
    assert report["holdout_kl_after"] == pytest.approx(after, rel=1e-4)


def test_no_gain_keeps_the_untuned_scales(quantized, tmp_path):
    """lr 0: nothing can improve, so the written scales are the untuned ones, bit for bit."""
    out = tmp_path / "same"
    args = ["--model", str(quantized), "--out", str(out), *TUNE_ARGS, "--lr", "0", "--steps", "2"]
    assert tune.main(args) == 0
    before, after = _parts(quantized), _parts(out)
    assert before.keys() == after.keys()
    for part in before:
        a, b = _leaves(before[part]), _leaves(after[part])
        assert all(np.array_equal(v.view(np.uint8), b[k].view(np.uint8)) for k, v in a.items())
    assert not json.loads((out / "report.json").read_text())["tuning"]["kept"]


def test_bad_inputs_are_one_line_and_write_nothing(quantized, tmp_path, capsys):
    out = tmp_path / "never"
    assert tune.main(["--model", str(REFERENCE_DIR), "--out", str(out)]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert tune.main(["--model", str(quantized), "--out", str(quantized)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = ["--model", str(quantized), "--out", str(out), "--holdout-fraction", "1.5"]
    assert tune.main(bad) == 2
    assert "holdout-fraction" in capsys.readouterr().err
    assert not out.exists()


def test_compiled_programs_hold_no_model_weights(quantized, monkeypatch):
    """Every array reaches the tuner's compiled functions as an argument: a closed-over array is
    a constant of the program, and the tuner's functions would otherwise hold both whole models
    (at real sizes, gigabytes of constants in every program). Each call's lowered program is read
    (public `jax.jit(...).lower(...).as_text()`) and must be far smaller than the weights."""
    from bitsmoe_jax.serve.scale_tuning import TuneConfig, tune_scales

    real_jit = jax.jit
    sizes: list[int] = []

    def spying_jit(fun, **kw):
        jitted = real_jit(fun, **kw)

        def call(*args, **kwargs):
            sizes.append(len(jitted.lower(*args, **kwargs).as_text()))
            return jitted(*args, **kwargs)

        return call

    model, _ = load_quantized(quantized, backend="xla")
    reference, _ = load_model(REFERENCE_DIR)
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(reference)))
    tokens = tokenize_text(load_tokenizer(REFERENCE_DIR), read_text("shakespeare_train"))
    windows, holdout = calibration_windows(tokens, SEQ, 8, 0.25, 0)
    monkeypatch.setattr(jax, "jit", spying_jit)
    tune_scales(model, reference, windows, holdout, TuneConfig(steps=2, batch_size=2, eval_every=1))
    assert len(sizes) >= 4  # teacher, held-out KL (two kinds), step
    # a program holding the weights as constants prints them in hex: over 2 × their bytes
    assert max(sizes) < weights / 10, (max(sizes), weights)
