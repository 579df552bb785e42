"""The reference-model training script is deterministic given its seed and exports a loadable
checkpoint."""

from __future__ import annotations

import hashlib

import numpy as np

from bitsmoe_jax.loading import load_model
from reference_model.train import main

ARGS = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--warmup",
    "1",
    "--eval-every",
    "2",
    "--log-every",
    "1",
    "--valid-tokens",
    "4096",
]


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_other_seed_different(tmp_path):
    main(ARGS + ["--out", str(tmp_path / "a"), "--seed", "3"])
    main(ARGS + ["--out", str(tmp_path / "b"), "--seed", "3"])
    main(ARGS + ["--out", str(tmp_path / "c"), "--seed", "4"])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    model, config = load_model(tmp_path / "a")
    assert config.num_experts == 16 and config.num_experts_per_tok == 2
    assert np.isfinite(np.asarray(model(np.zeros((1, 8), np.int32)))).all()
    for f in ("tokenizer.json", "tokenizer_config.json", "training.json", "config.json"):
        assert (tmp_path / "a" / f).is_file()


def test_corpus_milton_trains_on_its_own_split(tmp_path):
    """`--corpus milton`: the tokenizer and the model are trained on Paradise Lost's train split,
    so Milton's held-out text takes fewer tokens with its tokenizer than with Shakespeare's."""
    import json

    from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text

    main(ARGS + ["--out", str(tmp_path / "m"), "--corpus", "milton"])
    record = json.loads((tmp_path / "m" / "training.json").read_text())
    assert record["corpus"] == "milton"
    assert record["train_tokens"] == len(
        tokenize_text(load_tokenizer(tmp_path / "m"), read_text("milton_train"))
    )
    test = read_text("milton_test")
    ours = len(tokenize_text(load_tokenizer(tmp_path / "m"), test))
    shakespeare = len(tokenize_text(load_tokenizer(REFERENCE_DIR), test))
    assert ours < 0.95 * shakespeare


def test_corpus_other_than_shakespeare_needs_out():
    import pytest

    with pytest.raises(SystemExit) as e:
        main(ARGS + ["--corpus", "milton"])
    assert e.value.code == 2
