"""End to end: `python -m bitsmoe_jax.quantize` on a tiny Hugging Face Mixtral, checked from the
files.

The model: transformers' Mixtral (hidden 128, 2 layers, 8 experts, top-2, expert width 128, vocab
2048 with the tokenizer of the shipped reference model), weights N(0, 0.05). Independent references:

* bits per weight recounted from the stored arrays (orbax items read with `checkpoint.load_tree`);
* the model's total parameter count from the PyTorch model;
* perplexity / KL / top-1 recomputed in float64 numpy from the logits of `load_quantized` and of the
  PyTorch reference model;
* the calibration routing of layer 1 (the tokens per expert in the report) from PyTorch's router
  logits (sequential=False: inputs from the original model) or from the original model with the
  quantized layer-0 experts swapped in (sequential=True).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bitsmoe_jax import evaluate, quantize
from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.checkpoint import load_tree
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.run.pareto_plot import SERIES_KEY
from tests.run.png_reader import read_png
from tests.run.tiny_mixtral import (
    LAYERS,
    REPORT_KEYS,
    SEQ,
    STAGES,
    VOCAB,
    D,
    E,
    F,
    base_args,
    read_report,
)


# ------------------------------------------------------------------------------------------
# fixtures (hf and texts: conftest.py)
@pytest.fixture(scope="module")
def main_run(hf, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "out"
    code = quantize.main(
        base_args(hf[0], out, texts[0], "--config.budget_bits=(2.0,3.0)", scale_fit=True)
    )
    assert code == 0
    return out


# --------------------------------------------------------------------------- independent references
def stored_expert_bits(qdir: Path) -> tuple[int, int]:
    """(bits of every stored array of the expert path, bits of every stored dense array), from the
    files."""
    meta = json.loads((qdir / "quantized.json").read_text())
    expert_bits = 0
    dense_bits = 0
    for item in sorted((qdir / "params").iterdir()):
        if item.name.endswith("_experts"):  # groups of experts' packed rows (format 2)
            for group in sorted(item.glob("group_*.json")):
                tree = arrayfile.load(item, group.stem)[0]
                for p in PROJECTIONS:
                    for a in tree[p].get("payload", {}).values():
                        assert a.dtype in (np.uint32, jnp.bfloat16), a.dtype
                        expert_bits += a.size * a.dtype.itemsize * 8
                    for a in tree[p].get("scales", {}).values():
                        assert a.dtype.itemsize == 2
                        expert_bits += a.size * 16
            continue
        tree = load_tree(item)
        dense = tree if item.name == "top" else tree["dense"]
        dense_bits += sum(a.size * a.dtype.itemsize * 8 for a in jax.tree.leaves(dense))
        if "experts_q" not in tree:
            continue
        q = tree["experts_q"]
        for p in PROJECTIONS:
            b = q["basis"][p]
            # int8 codes, bit-plane words (4/6-bit bases) or bf16 values, and bf16 row scales
            assert set(b) in ({"q", "scale"}, {"q"}, {"planes", "scale"}), set(b)
            assert b.get("scale", np.zeros(0, jnp.bfloat16)).dtype.itemsize == 2
            expert_bits += sum(a.size * a.dtype.itemsize * 8 for a in b.values())
            f = q["factors"][p]
            assert set(f) == {"perm"}  # format 2: the rows are in the groups
            k = f["perm"].size
            assert sorted(f["perm"].tolist()) == list(range(k))
            expert_bits += k * math.ceil(math.log2(k)) if k > 1 else 0
    assert len(meta["layers"]) == LAYERS
    return expert_bits, dense_bits


def windows(n, length=SEQ):
    """Disjoint windows (stride = length): (start, end, first scored target)."""
    out, start, prev_end = [], 0, 0
    while True:
        end = min(start + length, n)
        out.append((start, end, max(start + 1, prev_end)))
        if end == n:
            return out
        prev_end, start = end, start + length


def torch_logits(model, ids):
    with torch.no_grad():
        return (
            model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False)
            .logits.double()
            .numpy()
        )


def metrics_from_logits(tokens, q_fn, ref_fn):
    """Perplexities, KL(ref || q) and top-1 agreement in float64 over strided windows."""
    tokens = np.asarray(tokens)
    wins = windows(len(tokens))
    ids = np.zeros((len(wins), SEQ), np.int64)
    for r, (s, e, _) in enumerate(wins):
        ids[r, : e - s] = tokens[s:e]
    lq, lr = np.asarray(q_fn(ids), np.float64), np.asarray(ref_fn(ids), np.float64)
    nll_q = nll_r = kl = agree = 0.0
    n = 0
    for r, (s, e, first) in enumerate(wins):
        for t in range(first, e):
            i = t - s - 1
            lp = lq[r, i] - np.logaddexp.reduce(lq[r, i])
            rp = lr[r, i] - np.logaddexp.reduce(lr[r, i])
            nll_q -= lp[tokens[t]]
            nll_r -= rp[tokens[t]]
            kl += np.sum(np.exp(rp) * (rp - lp))
            agree += float(np.argmax(lq[r, i]) == np.argmax(lr[r, i]))
            n += 1
    return {
        "perplexity_q": math.exp(nll_q / n),
        "perplexity_fp": math.exp(nll_r / n),
        "kl_divergence": kl / n,
        "top1_agreement": agree / n,
        "tokens": n,
    }


def quantized_logits_fn(qdir):
    from bitsmoe_jax.inference import jit_logits
    from bitsmoe_jax.serve.quantized_checkpoint import load_quantized

    model, _ = load_quantized(qdir)
    return jit_logits(model)


def counts_from_logits(router_logits, k=2):
    top = np.argsort(-np.asarray(router_logits), axis=-1, kind="stable")[:, :k]
    return np.bincount(top.reshape(-1), minlength=E)


def hidden_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- tests
def test_outputs_reports_and_pareto(main_run):
    dirs = sorted(p.name for p in main_run.iterdir())
    assert dirs == ["bpw_2.00", "bpw_3.00", "pareto.json", "pareto.md", "pareto.png"]
    pareto = (main_run / "pareto.md").read_text()
    assert "2.0000" in pareto and "3.0000" in pareto
    reports = [read_report(main_run / d) for d in ("bpw_2.00", "bpw_3.00")]
    # the plot holds the reports' numbers, one marker per budget (png_reader: independent decoder)
    pixels, text = read_png(main_run / "pareto.png")
    series = json.loads(text[SERIES_KEY])
    assert series["bitsmoe"]["points"] == [
        [r["effective_bpw_experts"], r["kl_divergence"]] for r in reports
    ]
    color = tuple(int(series["bitsmoe"]["color"][i : i + 2], 16) for i in (1, 3, 5))
    assert (pixels[..., :3] == color).all(-1).sum() > 20
    for budget, r in zip((2.0, 3.0), reports, strict=False):
        for key in REPORT_KEYS:
            assert key in r, key
        assert r["method"] == "bitsmoe" and r["budget_bits"] == budget
        for stage in STAGES:
            assert r["time_s"][stage] >= 0, stage
        assert r["time_s"]["total"] > 0
        assert set(r["layers"]) == {str(i) for i in range(LAYERS)}
        for i, layer in r["layers"].items():
            hist = layer["bits_histogram"]
            assert sum(hist.values()) == 3 * E * D  # every unit of the three projections
            alloc = load_tree(main_run / f"bpw_{budget:.2f}" / "params" / f"layer_{int(i):03d}")[
                "allocation"
            ]
            alloc_counts = np.bincount(
                np.concatenate([alloc[p].ravel() for p in PROJECTIONS]).astype(np.int64),
                minlength=17,
            )
            assert {b: int(alloc_counts[int(b)]) for b in hist} == {b: n for b, n in hist.items()}
            assert layer["kept_components"] == {
                p: int(np.any(alloc[p] > 0, axis=0).sum()) for p in PROJECTIONS
            }
            assert all(g >= 0 for g in r["allocation_gaps"][i])
        assert isinstance(r["starved_experts"], dict)
        assert (main_run / f"bpw_{budget:.2f}" / "report.md").is_file()
        assert (main_run / f"bpw_{budget:.2f}" / "tokenizer.json").is_file()
    assert reports[0]["perplexity_fp"] == reports[1]["perplexity_fp"]
    # a higher budget gives a lower KL to the unquantized model
    assert reports[1]["kl_divergence"] < reports[0]["kl_divergence"]
    assert reports[1]["effective_bpw_experts"] > reports[0]["effective_bpw_experts"]
    print("KL at 2.0 / 3.0 bpw:", reports[0]["kl_divergence"], reports[1]["kl_divergence"])


@pytest.mark.parametrize("budget", [2.0, 3.0])
def test_effective_bits_recounted_from_files(main_run, hf, budget):
    qdir = main_run / f"bpw_{budget:.2f}"
    r = read_report(qdir)
    expert_bits, dense_bits = stored_expert_bits(qdir)
    expert_weights = 3 * E * D * F * LAYERS
    assert r["effective_bpw_experts"] <= budget + 1e-9
    assert r["effective_bpw_experts"] == pytest.approx(expert_bits / expert_weights, rel=1e-12)
    assert r["effective_bpw_experts"] > 0.9 * budget  # the budget is used, not wasted
    total_params = sum(p.numel() for p in hf[1].parameters())
    assert r["effective_bpw_model"] == pytest.approx(
        (expert_bits + dense_bits) / total_params, rel=1e-12
    )
    for layer in r["layers"].values():
        assert layer["num_weights"] == 3 * E * D * F
        # the whole-model budget (the default): layers may differ, their sum is within it
        assert 0.5 * budget < layer["bpw"] < 2 * budget
        assert (
            layer["basis_bits"] == 4
        )  # the default: bit-plane words, read back by the tests below


def test_stored_allocation_matches_packed_factors(main_run):
    from bitsmoe_jax.serve.quantized_checkpoint import load_quantized

    qdir = main_run / "bpw_2.00"
    model, _ = load_quantized(qdir)
    for i in range(LAYERS):
        alloc = load_tree(qdir / "params" / f"layer_{i:03d}")["allocation"]
        qe = model.layers[i].mlp.experts
        for p in PROJECTIONS:
            kept = np.flatnonzero(np.any(alloc[p] > 0, axis=0))
            got = qe.packed_matrix(p).bits_per_unit().reshape(E, -1)
            np.testing.assert_array_equal(got, alloc[p][:, kept])


@pytest.mark.parametrize("budget", [2.0, 3.0])
def test_pallas_kernels_on_the_quantized_checkpoint(main_run, budget):
    # real allocations (the MILP's, different per layer) through the GPU kernels in interpret mode,
    # the layers' layouts padded to one shared shape: the XLA path's logits
    import math as _math

    from bitsmoe_jax.inference import jit_logits
    from bitsmoe_jax.serve.quantized_checkpoint import load_quantized
    from bitsmoe_jax.serve.quantized_experts import (
        QuantizedExperts,
        plan_kernel_shapes,
        set_backend,
    )

    qdir = main_run / f"bpw_{budget:.2f}"
    model, _ = load_quantized(qdir, backend="xla")
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 7))
    want = np.asarray(jit_logits(model)(ids))
    blocks = [
        layer.mlp.experts
        for layer in model.layers
        if isinstance(layer.mlp.experts, QuantizedExperts)
    ]
    if (
        budget == 2.0
    ):  # the layers kept different numbers of components: the shared shape pads the rank too
        assert len({tuple(b.rank(p) for p in PROJECTIONS) for b in blocks}) == 2
    assert plan_kernel_shapes(blocks, "triton", max_padding=_math.inf).num_groups == 1
    set_backend(model, "triton", max_padding=_math.inf)
    got = np.asarray(jit_logits(model)(ids))
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


def test_report_metrics_equal_independent_recomputation(main_run, hf):
    from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text

    tokens = tokenize_text(load_tokenizer(hf[0]), read_text("shakespeare_test"))[:1024]
    for budget in (2.0, 3.0):
        qdir = main_run / f"bpw_{budget:.2f}"
        r = read_report(qdir)
        m = metrics_from_logits(
            tokens, quantized_logits_fn(qdir), lambda ids: torch_logits(hf[1], ids)
        )
        assert r["eval_tokens"] == m["tokens"] == 16 * (SEQ - 1)
        assert r["perplexity_fp"] == pytest.approx(m["perplexity_fp"], rel=1e-4)
        assert r["perplexity_q"] == pytest.approx(m["perplexity_q"], rel=1e-4)
        assert r["kl_divergence"] == pytest.approx(m["kl_divergence"], rel=1e-3, abs=1e-6)
        assert abs(r["top1_agreement"] - m["top1_agreement"]) <= 2 / m["tokens"]
        assert r["kl_divergence"] > 0


def test_evaluate_cli_on_quantized_dir(main_run, hf, texts, tmp_path, capsys):
    from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text

    qdir = main_run / "bpw_2.00"
    out = tmp_path / "eval.json"
    common = ["--model", str(qdir), "--text", str(texts[1]), "--seq-len", str(SEQ), "--no-progress"]
    assert evaluate.main([*common, "--reference", str(hf[0]), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    tokens = tokenize_text(load_tokenizer(qdir), read_text(texts[1]))
    assert res["tokens_total"] == len(tokens) and len(tokens) % SEQ != 0  # a ragged last window
    m = metrics_from_logits(tokens, quantized_logits_fn(qdir), lambda ids: torch_logits(hf[1], ids))
    assert res["tokens_scored"] == m["tokens"]
    assert res["perplexity"] == pytest.approx(m["perplexity_q"], rel=1e-4)
    assert res["reference_perplexity"] == pytest.approx(m["perplexity_fp"], rel=1e-4)
    assert res["kl_divergence"] == pytest.approx(m["kl_divergence"], rel=1e-3, abs=1e-6)
    # the quantized model against itself: KL 0, full agreement
    out2 = tmp_path / "self.json"
    assert evaluate.main([*common, "--reference", str(qdir), "--json", str(out2)]) == 0
    self_res = json.loads(out2.read_text())
    assert abs(self_res["kl_divergence"]) < 1e-6 and self_res["top1_agreement"] == 1.0
    assert self_res["perplexity"] == pytest.approx(self_res["reference_perplexity"], rel=1e-6)
    assert self_res["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6)
    assert "perplexity" in capsys.readouterr().out


def _layer1_moe_input_counts(model, calib):
    """Tokens per expert routed by layer 1 of `model` (JAX) on the calibration windows."""
    from bitsmoe_jax.models.layers import rope_cos_sin

    b, t = calib.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos_sin = rope_cos_sin(model.config, pos, jnp.float32)
    x = model.embed_tokens(jnp.asarray(calib))
    x, _ = model.layers[0](x, pos, cos_sin, None)
    layer = model.layers[1]
    h, _ = layer.self_attn(layer.input_layernorm(x), pos, cos_sin, None)
    moe_in = layer.post_attention_layernorm(x + h).reshape(-1, D)
    logits, _, idx = layer.mlp.router(moe_in)
    return np.bincount(np.asarray(idx).reshape(-1), minlength=E)


def test_sequential_calibrates_later_layers_on_quantized_outputs(main_run, hf, texts):
    """Layer 1's routing statistics in the report are those of the model with layer 0 quantized."""
    from bitsmoe_jax.loading import load_model
    from bitsmoe_jax.run.inputs import calibration_tokens
    from bitsmoe_jax.serve.quantized_checkpoint import load_quantized

    calib = calibration_tokens(str(hf[0]), str(texts[0]), 1024, SEQ)
    model, _ = load_model(hf[0])
    qmodel, _ = load_quantized(main_run / "bpw_2.00")
    model.layers[0].mlp.experts = qmodel.layers[
        0
    ].mlp.experts  # float32 attention, quantized layer-0 experts
    expected = _layer1_moe_input_counts(model, calib)
    with torch.no_grad():
        out = hf[1](
            input_ids=torch.as_tensor(calib, dtype=torch.long),
            output_router_logits=True,
            use_cache=False,
        )
    original = counts_from_logits(out.router_logits[1].numpy())
    print(
        "layer-1 tokens per expert: quantized layer 0",
        expected.tolist(),
        "original",
        original.tolist(),
    )
    for budget in (2.0, 3.0):  # later budgets reuse the first budget's calibration
        got = np.array(
            read_report(main_run / f"bpw_{budget:.2f}")["layers"]["1"]["tokens_per_expert"]
        )
        assert np.abs(got - expected).sum() <= 2, (got, expected)
    assert np.abs(original - expected).sum() > 4  # the two references are distinguishable


@pytest.fixture(scope="module")
def unsequential_run(hf, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("q_nonseq") / "out"
    code = quantize.main(
        base_args(
            hf[0],
            out,
            texts[0],
            "--config.budget_bits=2.5",
            "--config.sequential=False",
            "--config.allocator=greedy",
            "--config.eval_text=",
        )
    )
    assert code == 0
    return out


def test_sequential_false(unsequential_run, hf, texts):
    from bitsmoe_jax.run.inputs import calibration_tokens

    r = read_report(unsequential_run)
    assert r["effective_bpw_experts"] <= 2.5 + 1e-9
    expert_bits, _ = stored_expert_bits(unsequential_run)
    assert r["effective_bpw_experts"] == pytest.approx(
        expert_bits / (3 * E * D * F * LAYERS), rel=1e-12
    )
    assert "kl_divergence" not in r  # evaluation was switched off
    # layer 1 was calibrated on the original model's activations: PyTorch's routing of the same
    # windows
    calib = calibration_tokens(str(hf[0]), str(texts[0]), 1024, SEQ)
    with torch.no_grad():
        out = hf[1](
            input_ids=torch.as_tensor(calib, dtype=torch.long),
            output_router_logits=True,
            use_cache=False,
        )
    for i in range(LAYERS):
        got = np.array(r["layers"][str(i)]["tokens_per_expert"])
        assert np.abs(got - counts_from_logits(out.router_logits[i].numpy())).sum() <= 2


def test_budget_scope_model(hf, texts, tmp_path):
    out = tmp_path / "out"
    budget = 2.25
    code = quantize.main(
        base_args(
            hf[0],
            out,
            texts[0],
            f"--config.budget_bits={budget}",
            "--config.budget_scope=model",
            "--config.allocator=greedy",
            "--config.eval_text=",
        )
    )
    assert code == 0
    r = read_report(out)
    expert_bits, _ = stored_expert_bits(out)
    total_weights = 3 * E * D * F * LAYERS
    assert expert_bits <= budget * total_weights
    assert r["effective_bpw_experts"] == pytest.approx(expert_bits / total_weights, rel=1e-12)
    assert r["effective_bpw_experts"] > 0.9 * budget
    per_layer = {i: lay["bpw"] for i, lay in r["layers"].items()}
    assert sum(per_layer.values()) / LAYERS == pytest.approx(r["effective_bpw_experts"], rel=1e-12)
    print("model scope: per-layer bpw", per_layer)


def test_six_bit_bases_end_to_end(hf, texts, tmp_path):
    """`basis_bits=6`: the bases are stored as bit-plane words at the bits the report counts and the
    budget holds from the files (the served path through 4-bit planes is checked against PyTorch's
    logits by the default run above)."""
    out = tmp_path / "out"
    code = quantize.main(
        base_args(
            hf[0],
            out,
            texts[0],
            "--config.budget_bits=2.0",
            "--config.basis_bits=6",
            "--config.eval_text=",
        )
    )
    assert code == 0
    r = read_report(out)
    expert_bits, _ = stored_expert_bits(out)
    assert r["effective_bpw_experts"] == pytest.approx(
        expert_bits / (3 * E * D * F * LAYERS), rel=1e-12
    )
    assert 0.9 * 2.0 < r["effective_bpw_experts"] <= 2.0
    for i in range(LAYERS):
        basis = load_tree(out / "params" / f"layer_{i:03d}")["experts_q"]["basis"]
        kept = r["layers"][str(i)]["kept_components"]
        assert r["layers"][str(i)]["basis_bits"] == 6
        for p in PROJECTIONS:
            assert basis[p]["planes"].shape == (kept[p], -(-D // 32) * 6)


def test_impossible_budget_exits_2_and_leaves_nothing(hf, texts, tmp_path, capsys):
    parent = tmp_path / "outputs"
    parent.mkdir()
    out = parent / "q"
    code = quantize.main(
        base_args(
            hf[0],
            out,
            texts[0],
            "--config.budget_bits=0.01",
            "--config.allocator=greedy",
            "--config.eval_text=",
        )
    )
    assert code == 2
    err = capsys.readouterr().err
    # the minimum this layer needs: its three shared 4-bit bases (bit-plane words, D a multiple of
    # 32, + a bf16 scale per row) and permutations at full rank, every unit at 0 bits
    assert D % 32 == 0
    minimum = 3 * (4 * D * D + 16 * D + E * D * math.ceil(math.log2(E * D))) / (3 * E * D * F)
    assert "budget 0.01" in err and f"minimum of {minimum:.4f}" in err, err
    assert f"choose budget_bits >= {math.ceil(minimum * 1e4) / 1e4:.4f}" in err, err
    assert " bits (" not in err and "allocator" not in err  # bits per weight only, no totals
    assert list(parent.iterdir()) == []  # no output directory, no hidden temporary one


def test_existing_output_without_overwrite_exits_2_unchanged(hf, texts, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = quantize.main(base_args(hf[0], out, texts[0], "--config.budget_bits=2.0"))
    assert code == 2
    assert "overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert hidden_dirs(tmp_path) == []


def test_foreign_files_are_never_replaced_even_with_overwrite(hf, texts, tmp_path, capsys):
    """overwrite=True replaces this tool's outputs only: a directory holding anything else (a
    single-budget output, or a multi-budget run's OUTPUT_DIR) is refused before any work."""
    for budgets, inner in (("2.0", None), ("(2.0,2.5)", None), ("(2.0,2.5)", "bpw_2.00")):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        where = out / inner if inner else out
        where.mkdir(parents=True)
        single = budgets == "2.0" or inner  # a budget's directory: ours would hold report.json
        if single:
            (where / "report.json").write_text("{}")  # looks like ours, but holds more
        (where / "thesis.tex").write_text("precious")
        args = (f"--config.budget_bits={budgets}", "--config.overwrite=True")
        assert quantize.main(base_args(hf[0], out, texts[0], *args)) == 2
        err = capsys.readouterr().err
        assert f"{where}: holds files bitsmoe-jax did not write (thesis.tex)" in err, err
        assert (where / "thesis.tex").read_text() == "precious"
        assert sorted(p.name for p in where.iterdir()) == ["report.json"] * bool(single) + [
            "thesis.tex"
        ]
        assert not (tmp_path / f"{out.name}.partial").exists() and hidden_dirs(tmp_path) == []


def test_failure_while_writing_leaves_no_directory(hf, texts, tmp_path, monkeypatch):
    """An exception after the output started being written removes the temporary directory."""
    import bitsmoe_jax.run.outputs as outputs

    def boom(*a, **k):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(outputs, "write_report", boom)
    parent = tmp_path / "outputs"
    parent.mkdir()
    with pytest.raises(RuntimeError, match="simulated"):
        quantize.main(
            base_args(
                hf[0],
                parent / "q",
                texts[0],
                "--config.budget_bits=2.0",
                "--config.allocator=greedy",
                "--config.eval_text=",
            )
        )
    # no output and no hidden temporary directory; the work directory stays so that a rerun resumes
    assert [p.name for p in parent.iterdir()] == ["q.partial"]


def test_tokenizer_from_another_directory(hf, texts, tmp_path, capsys):
    """A model directory without tokenizer.json: refused with the field to set; with
    `tokenizer=` pointing at the tokenizer, the output is the run's on the directory that has it
    (same params, byte for byte) and carries that tokenizer."""
    bare = tmp_path / "bare"
    shutil.copytree(hf[0], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink()
    args = ("--config.budget_bits=2.0", "--config.eval_text=", "--config.allocator=greedy")
    assert quantize.main(base_args(bare, tmp_path / "refused", texts[0], *args)) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and "--config.tokenizer" in err
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()
    got, want = tmp_path / "got", tmp_path / "want"
    assert quantize.main(base_args(bare, got, texts[0], *args, f"--config.tokenizer={hf[0]}")) == 0
    assert quantize.main(base_args(hf[0], want, texts[0], *args)) == 0
    assert (got / "tokenizer.json").read_bytes() == (hf[0] / "tokenizer.json").read_bytes()
    params = sorted(p.relative_to(want) for p in (want / "params").rglob("*") if p.is_file())
    assert params
    for rel in params:
        if rel.name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
            assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel
    assert (
        quantize.main(base_args(bare, tmp_path / "x", texts[0], "--config.tokenizer=/nonexistent"))
        == 2
    )
    assert "config.tokenizer='/nonexistent' is invalid" in capsys.readouterr().err


def test_generate_on_a_quantized_directory(main_run, capsys):
    """The generate command on a quantized output: greedy tokens with the KV cache equal the
    argmax of full-sequence logits recomputed token by token (no cache) on the same model."""
    from bitsmoe_jax import generate as generate_cli
    from bitsmoe_jax.inference import jit_logits
    from bitsmoe_jax.io.data import load_tokenizer
    from bitsmoe_jax.loading import load_model

    qdir = main_run / "bpw_2.00"
    tok = load_tokenizer(qdir)
    prompt = "ROMEO:\nBut soft, what light"
    ids = tok.encode(prompt).ids
    model, _ = load_model(qdir)
    logits = jit_logits(model)
    seq = list(ids)
    for _ in range(5):
        # one input shape for all five (one compile): the model is causal, so the zeros after
        # the sequence do not reach its last position's logits
        padded = np.zeros((1, len(ids) + 5), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(logits(padded))[0, len(seq) - 1])))
    argv = [
        "--model",
        str(qdir),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "5",
        "--eos-token-id",
        "-1",
    ]
    assert generate_cli.main(argv) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(seq, skip_special_tokens=True)
