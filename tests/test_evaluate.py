"""`bitsmoe_jax.evaluate`: strided perplexity, KL / top-1 against a reference, the CLI.

References are independent of the code under test: perplexity is recomputed with Hugging Face
transformers in PyTorch by the textbook strided loop (`labels` masked with -100), KL and top-1 with
numpy in float64 from per-window logits computed one window at a time (no batching, no padding).

The model is the shipped reference MoE (`reference_model.train.REFERENCE_DIR`), or the
directory named by the environment variable BITSMOE_TEST_MODEL when it is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitsmoe_jax.evaluate import evaluate_model, main
from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.io import data
from bitsmoe_jax.io.data import REFERENCE_DIR

MODEL_DIR = Path(os.environ.get("BITSMOE_TEST_MODEL") or REFERENCE_DIR)

N_PARITY = 1500  # tokens of the test split used against the PyTorch reference
REQUIRED_KEYS = {
    "perplexity",
    "tokens_scored",
    "model",
    "text",
    "seq_len",
    "stride",
    "time_s",
    "nll_sum",
}
REFERENCE_KEYS = {"kl_divergence", "top1_agreement", "reference_perplexity"}


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    """The whole shipped test split, tokenized once with the model's tokenizer."""
    tok = data.load_tokenizer(MODEL_DIR)
    return data.tokenize_text(tok, data.read_text("shakespeare_test"))


@pytest.fixture(scope="module")
def model():
    from bitsmoe_jax.loading import load_model

    return load_model(MODEL_DIR)[0]


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # Windows of 64 tokens are too small to gain from intra-op threads, and on a busy CPU torch's
    # thread barriers cost ~25x (measured 0.8 s with one thread, 20 s with two); restored
    # afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield transformers.AutoModelForCausalLM.from_pretrained(
            MODEL_DIR, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def perturbed(model):
    """A copy of `model` with every parameter multiplied by (1 + 0.05 * N(0, 1))."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    noisy = [a * jnp.asarray(1.0 + 0.05 * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------------ (1) vs. PyTorch
@pytest.mark.parametrize("seq_len,stride", [(64, 64), (64, 32)])
def test_perplexity_matches_transformers_strided_loop(model, hf_model, tokens, seq_len, stride):
    torch = pytest.importorskip("torch")
    hf = hf_model

    x = tokens[:N_PARITY]
    # Textbook strided perplexity: windows of seq_len starting every `stride`; each window's
    # labels before the previous window's end are -100, so every target is counted once.
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(x), stride):
        end = min(begin + seq_len, len(x))
        ids = torch.as_tensor(x[begin:end], dtype=torch.long)[None]
        labels = ids.clone()
        labels[:, : max(prev_end - begin, 1)] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.no_grad():
                loss = hf(input_ids=ids, labels=labels, use_cache=False).loss
            nll_sum += float(loss) * n
            n_scored += n
        prev_end = end
        if end == len(x):
            break
    expected_ppl = float(np.exp(nll_sum / n_scored))

    got = evaluate_model(model, x, seq_len, stride, batch_size=8)
    assert got["tokens_scored"] == n_scored
    assert got["perplexity"] == pytest.approx(expected_ppl, rel=1e-3)
    assert got["nll_sum"] == pytest.approx(nll_sum, rel=1e-3)
    if stride < seq_len:
        assert n_scored == len(x) - 1  # overlapping windows score every position but the first


def test_batch_size_and_padding_do_not_change_results(model, tokens):
    """The short last window is right-padded and spare batch rows are padding: never scored."""
    x = tokens[:700]  # seq 64 / stride 48: the last window (672..700) is shorter than 64
    results = [evaluate_model(model, x, 64, 48, batch_size=b) for b in (8, 3)]
    assert results[0]["tokens_scored"] == results[1]["tokens_scored"] == len(x) - 1
    assert results[1]["nll_sum"] == pytest.approx(results[0]["nll_sum"], rel=1e-5)


# -------------------------------------------------------------------------- (2) KL and top-1
def test_kl_to_itself_is_zero(model, tokens):
    got = evaluate_model(model, tokens[:600], 64, 64, batch_size=8, reference=model)
    assert REFERENCE_KEYS <= got.keys()
    assert abs(got["kl_divergence"]) < 1e-6
    assert got["top1_agreement"] == 1.0
    assert got["reference_perplexity"] == pytest.approx(got["perplexity"], rel=1e-7)


def test_kl_against_perturbed_copy_matches_numpy(model, perturbed, tokens):
    seq_len, stride = 64, 48
    x = tokens[: seq_len + 13 * stride]  # 14 windows, all of full length
    got = evaluate_model(perturbed, x, seq_len, stride, batch_size=8, reference=model)

    windows = []  # (begin, end, first counted target), the textbook strided plan
    prev_end = 0
    for begin in range(0, len(x), stride):
        end = min(begin + seq_len, len(x))
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == len(x):
            break
    assert len(windows) == 14 and all(e - b == seq_len for b, e, _ in windows)
    # Logits of each window at its exact length, no padding: windows 0-7 and 6-13 as two stacks of
    # 8 real windows (the [8, 64] shape the evaluation already compiled).
    lp_ref, lp_mod = {}, {}
    for chunk in (windows[:8], windows[-8:]):
        ids = np.stack([x[b:e] for b, e, _ in chunk])
        for out, m in ((lp_ref, model), (lp_mod, perturbed)):
            logp = _log_softmax64(np.asarray(jit_logits(m)(ids)))
            out.update({b: logp[i] for i, (b, _, _) in enumerate(chunk)})

    kl_sum, agree, n, nll_model, nll_ref = 0.0, 0, 0, 0.0, 0.0
    for begin, end, first in windows:
        rows = np.arange(
            first - begin - 1, end - begin - 1
        )  # logits rows predicting targets first..end-1
        targets = x[rows + begin + 1]
        r, m = lp_ref[begin][rows], lp_mod[begin][rows]
        kl_sum += float((np.exp(r) * (r - m)).sum())
        agree += int((r.argmax(-1) == m.argmax(-1)).sum())
        nll_model -= float(m[np.arange(len(rows)), targets].sum())
        nll_ref -= float(r[np.arange(len(rows)), targets].sum())
        n += len(rows)

    assert got["tokens_scored"] == n == len(x) - 1 == sum(e - f for _, e, f in windows)
    assert 1e-3 < kl_sum / n  # the perturbation is visible, so the comparison means something
    assert got["kl_divergence"] == pytest.approx(kl_sum / n, rel=1e-3)
    # argmax may flip on a near-tie between batched and single-window logits; allow two such
    assert abs(got["top1_agreement"] - agree / n) <= 2 / n
    assert got["top1_agreement"] < 1.0
    assert got["perplexity"] == pytest.approx(np.exp(nll_model / n), rel=1e-4)
    assert got["reference_perplexity"] == pytest.approx(np.exp(nll_ref / n), rel=1e-4)


# ------------------------------------------------------------------------- (3) tokens_scored
@pytest.mark.parametrize(
    "n_tokens,seq_len,stride",
    [(700, 64, 64), (641, 64, 64), (700, 64, 32), (700, 64, 20), (700, 64, 80), (700, 64, 50)],
)
def test_tokens_scored_matches_window_plan(model, tokens, n_tokens, seq_len, stride):
    windows = data.strided_windows(n_tokens, seq_len, stride)
    counted = np.zeros(n_tokens, np.int64)
    for w in windows:
        counted[w.score_from : w.end] += 1
    assert counted.max() == 1  # no target counted twice
    assert counted[0] == 0
    got = evaluate_model(model, tokens[:n_tokens], seq_len, stride, batch_size=8)
    assert got["tokens_scored"] == int(counted.sum()) == sum(w.end - w.score_from for w in windows)
    assert got["num_windows"] == len(windows)
    if stride < seq_len:
        assert got["tokens_scored"] == n_tokens - 1
    elif (
        stride == seq_len
    ):  # disjoint blocks: the block starts k*seq_len (k >= 1) are never targets
        assert got["tokens_scored"] == n_tokens - 1 - (n_tokens - 1) // seq_len


# -------------------------------------------------------------------------------- (4) the CLI
def _model_without_tokenizer(tmp_path: Path) -> Path:
    """A model directory that links to MODEL_DIR's files but has no tokenizer.json."""
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    for f in MODEL_DIR.iterdir():
        if f.name != "tokenizer.json" and f.is_file():
            (d / f.name).symlink_to(f.resolve())
    return d


def _small_text(tmp_path: Path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text(data.read_text("shakespeare_test")[:8000], encoding="utf-8")
    return p


def test_cli_end_to_end(tmp_path, capsys):
    text = _small_text(tmp_path)
    out = tmp_path / "res" / "eval.json"
    # --tokenizer override: the model directory itself has no tokenizer.json.
    rc = main(
        [
            "--model",
            str(_model_without_tokenizer(tmp_path)),
            "--text",
            str(text),
            "--seq-len",
            "64",
            "--stride",
            "64",
            "--reference",
            str(MODEL_DIR),
            "--tokenizer",
            str(MODEL_DIR),
            "--batch-size",
            "8",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(out.read_text())
    assert REQUIRED_KEYS | REFERENCE_KEYS <= res.keys()
    assert not list(out.parent.glob("*.tmp"))  # the atomic write left no temporary file behind
    assert res["seq_len"] == 64 and res["stride"] == 64 and res["text"] == str(text)
    # The model is the reference's weights: identical distributions.
    assert abs(res["kl_divergence"]) < 1e-6 and res["top1_agreement"] == 1.0
    assert res["perplexity"] == pytest.approx(res["reference_perplexity"], rel=1e-7)
    assert res["perplexity"] == pytest.approx(
        np.exp(res["nll_sum"] / res["tokens_scored"]), rel=1e-9
    )
    # Same numbers as the library call on the same tokens.
    toks = data.tokenize_text(data.load_tokenizer(MODEL_DIR), text.read_text(encoding="utf-8"))
    assert res["tokens_scored"] == sum(
        w.end - w.score_from for w in data.strided_windows(len(toks), 64, 64)
    )
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith(
        f"perplexity {res['perplexity']:.2f} over {res['tokens_scored']:,} tokens"
    )
    assert "KL" in line and "top-1 100.0%" in line


# ----------------------------------------------------------------------------- (5) bad inputs
def test_missing_model_dir(tmp_path, capsys):
    rc = main(
        [
            "--model",
            str(tmp_path / "nope"),
            "--text",
            "shakespeare_test",
            "--json",
            str(tmp_path / "o.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "model directory not found" in err and "nope" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_not_a_model_dir(tmp_path, capsys):
    rc = main(["--model", str(tmp_path), "--text", "shakespeare_test"])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err


def test_missing_reference_dir(tmp_path, capsys):
    rc = main(
        [
            "--model",
            str(MODEL_DIR),
            "--reference",
            str(tmp_path / "ref"),
            "--text",
            "shakespeare_test",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "reference model directory not found" in err


def test_missing_text(tmp_path, capsys):
    rc = main(["--model", str(MODEL_DIR), "--text", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.txt" in err and "shakespeare_test" in err  # lists the shipped names


def test_non_utf8_text_is_named(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("na\u00efve caf\u00e9 ".encode("latin-1") * 20)
    rc = main(["--model", str(MODEL_DIR), "--text", str(text)])
    err = capsys.readouterr().err
    assert (
        rc == 2 and str(text) in err and "not UTF-8" in err and "byte 2" in err
    )  # n, a, then ï (0xef)


def test_missing_tokenizer(tmp_path, capsys):
    rc = main(["--model", str(_model_without_tokenizer(tmp_path)), "--text", "shakespeare_test"])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer.json" in err and "--tokenizer" in err
    rc = main(
        [
            "--model",
            str(MODEL_DIR),
            "--tokenizer",
            str(tmp_path / "tk"),
            "--text",
            "shakespeare_test",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer.json" in err
