"""`python -m bitsmoe_jax.generate` and `inference.generate` against Hugging Face on the shipped
reference model: greedy equals `generate(do_sample=False)`, EOS stops as in Hugging Face, sampled
tokens come from Hugging Face's own next-token distribution (top-k / top-p sets from its logits),
and a seed reproduces its tokens."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax import generate as generate_cli
from bitsmoe_jax.inference import generate
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer
from bitsmoe_jax.loading import load_model

PROMPT = "KING HENRY:\nNow, lords, to France; the"


@pytest.fixture(scope="module")
def ref():
    """(our model, HF model, tokenizer, prompt ids) of the shipped reference model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _ = load_model(REFERENCE_DIR)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        REFERENCE_DIR, dtype=torch.float32
    ).eval()
    tok = load_tokenizer(REFERENCE_DIR)
    return model, hf, tok, tok.encode(PROMPT).ids


def hf_generate(hf, ids, n, **kw):
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw
        )
    return out[0, len(ids) :].tolist()


def hf_next_probs(hf, ids, temperature):
    import torch

    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].double() / temperature
    return torch.softmax(logits, -1).numpy()


def test_cli_greedy_text_equals_hugging_face_generate(ref, capsys):
    _, hf, tok, ids = ref
    want = hf_generate(hf, ids, 24, eos_token_id=None)
    assert len(set(want)) > 3  # not a constant continuation
    code = generate_cli.main(
        ["--model", str(REFERENCE_DIR), "--prompt", PROMPT, "--max-new-tokens", "24"]
    )
    assert code == 0
    expected = tok.decode(ids + want, skip_special_tokens=True)
    if 0 in want:  # the config's eos (0) stops the CLI: compare up to it
        expected = tok.decode(ids + want[: want.index(0) + 1], skip_special_tokens=True)
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_eos_stops_like_hugging_face(ref):
    model, hf, _, ids = ref
    free = hf_generate(hf, ids, 12, eos_token_id=None)
    eos = free[4]
    want = hf_generate(hf, ids, 12, eos_token_id=eos)
    got = np.asarray(generate(model, np.asarray([ids]), 12, eos_token_id=eos))[0].tolist()
    assert got == want and got[-1] == eos and len(got) == free.index(eos) + 1


def test_sampling_follows_the_reference_distribution_and_its_seed(ref):
    model, hf, _, ids = ref
    n, temperature = 2048, 0.8
    p = hf_next_probs(hf, ids, temperature)
    batch = np.repeat(np.asarray([ids]), n, axis=0)
    draw = np.asarray(generate(model, batch, 1, temperature=temperature, seed=1))[:, 0]
    freq = np.bincount(draw, minlength=p.size) / n
    for t in np.argsort(-p)[:5]:  # the likeliest tokens: within 4.5 standard errors
        assert abs(freq[t] - p[t]) <= 4.5 * np.sqrt(p[t] * (1 - p[t]) / n) + 1e-3, (
            t,
            freq[t],
            p[t],
        )
    top5 = set(np.argsort(-p)[:5].tolist())
    k5 = np.asarray(generate(model, batch[:256], 1, temperature=temperature, top_k=5, seed=2))
    assert set(k5[:, 0].tolist()) <= top5
    order = np.argsort(-p)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.6)) + 1].tolist())
    tp = np.asarray(generate(model, batch[:256], 1, temperature=temperature, top_p=0.6, seed=3))
    assert set(tp[:, 0].tolist()) <= nucleus
    # top_k=1 is greedy whatever the temperature; a seed gives the same tokens, another seed others
    greedy = hf_generate(hf, ids, 8, eos_token_id=None)
    one = generate(model, np.asarray([ids]), 8, temperature=1.5, top_k=1, seed=7)
    assert np.asarray(one)[0].tolist() == greedy
    a, b, c = (
        np.asarray(generate(model, batch[:4], 16, temperature=1.0, seed=s)) for s in (5, 5, 6)
    )
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_bad_arguments_exit_2(capsys):
    assert generate_cli.main(["--model", "/nonexistent", "--prompt", "x"]) == 2
    assert "model directory not found" in capsys.readouterr().err
    args = ["--model", str(REFERENCE_DIR), "--prompt", "x", "--temperature", "1", "--top-p", "0"]
    assert generate_cli.main(args) == 2
    assert "top_p 0.0" in capsys.readouterr().err
