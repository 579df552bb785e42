"""Fixtures of the end-to-end quantization tests: the tiny Hugging Face Mixtral and short texts."""

from __future__ import annotations

import shutil

import pytest

from tests.run.tiny_mixtral import LAYERS, REF_TOKENIZER, VOCAB, D, E, F


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(directory, torch model) of the tiny Mixtral, tokenizer files copied from the shipped
    reference model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("hf_mixtral")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    cfg._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(cfg).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(noise + 1.0 if ("norm" in name and p.ndim == 1) else noise)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REF_TOKENIZER / f, out / f)
    return out, model


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A short calibration text (a slice of shakespeare_train) and a short evaluation text."""
    from bitsmoe_jax.io.data import read_text

    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(read_text("shakespeare_train")[:60_000])
    (d / "eval.txt").write_text(read_text("shakespeare_test")[5_000:6_200])
    return d / "calib.txt", d / "eval.txt"
