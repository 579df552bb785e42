"""The shipped reference MoE: shape rules, size, provenance record, HF parity, and that it learned.

Its perplexity is compared with count baselines on the same tokens (valid split here; the README
reports the test split), so "quantization damage is measurable" rests on a model that beats a
bigram.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.models.config import ModelConfig
from reference_model.ngram_baselines import bigram_perplexity
from reference_model.train import reference_config


def test_files_and_size():
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training.json",
    ):
        assert (REFERENCE_DIR / f).is_file(), f
    total = sum(p.stat().st_size for p in REFERENCE_DIR.iterdir())
    assert total <= 24_000_000, f"shipped reference model is {total} bytes (> 24 MB)"


def test_shape_rules_and_recorded_training():
    cfg = ModelConfig.from_hf_dir(REFERENCE_DIR)
    assert cfg == reference_config(cfg.vocab_size).replace(rope_scaling=None)
    assert cfg.model_type == "mixtral" and cfg.num_experts >= 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers >= 2 and cfg.hidden_size >= 256
    sides = [
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.vocab_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    ]
    assert all(s % 128 == 0 for s in sides), sides
    rec = json.loads((REFERENCE_DIR / "training.json").read_text())
    # the command as recorded when the shipped model was trained; the asset stays byte for byte
    # (it is fingerprinted with the model), so it names the trainer's module path of that day,
    # which is `reference_model.train` today
    assert rec["command"].startswith("python -m bitsmoe_jax.train_reference") and isinstance(
        rec["seed"], int
    )
    assert rec["train_time_s"] > 0 and rec["best_valid_ppl"] > 1


def test_hf_transformers_logits_match():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _ = load_model(REFERENCE_DIR)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        REFERENCE_DIR, dtype=torch.float32
    ).eval()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 96))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(ids.astype(np.int32)))
    assert np.abs(out - ref).max() <= 1e-4, np.abs(out - ref).max()


def test_beats_bigram_on_valid_split():
    tok = load_tokenizer(REFERENCE_DIR)
    train = tokenize_text(tok, read_text("shakespeare_train"))
    valid = tokenize_text(tok, read_text("shakespeare_valid"))[:20000]
    model, _ = load_model(REFERENCE_DIR)
    ppl = evaluate_model(model, valid, 256, 256, batch_size=8)["perplexity"]
    bigram = bigram_perplexity(train, valid, tok.get_vocab_size(), weight=0.8)
    assert ppl < 0.8 * bigram, (ppl, bigram)
