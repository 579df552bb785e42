"""Baselines in the same framework and the side-by-side comparison.

RTN against a plain numpy loop; matched-bits setting selection; `compare` end to end on a tiny model
(every method, the table and the GPTQ time ratio); `quantize --config.method=<baseline>` writing the
same report format, loadable by `load_model` and `evaluate`.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from bitsmoe_jax import compare, evaluate, quantize
from bitsmoe_jax.baselines.rtn import rtn_quantize
from bitsmoe_jax.baselines.run import nearest_setting, uniform_settings
from tests.quant.test_pipeline import base_args, hf, read_report, texts  # noqa: F401  (fixtures)


def _rtn_loop(w: np.ndarray, bits: int, g: int) -> np.ndarray:
    """Textbook RTN, one group at a time along axis 0 of a [K, N] matrix."""
    out = np.zeros_like(w)
    qmax = 2 ** (bits - 1) - 1
    for n in range(w.shape[1]):
        for s in range(0, w.shape[0], g):
            grp = w[s : s + g, n]
            scale = np.float32(ml_dtypes.bfloat16(np.abs(grp).max() / qmax))
            q = np.clip(np.rint(grp / scale), -qmax - 1, qmax) if scale > 0 else np.zeros_like(grp)
            out[s : s + g, n] = q * scale
    return out


@pytest.mark.parametrize("bits,g", [(2, 16), (3, 128), (4, 64), (8, 100)])
def test_rtn_matches_numpy_loop(bits, g):
    w = np.random.default_rng(bits).normal(size=(300, 7)).astype(np.float32)
    np.testing.assert_array_equal(rtn_quantize(w, bits, g, axis=0), _rtn_loop(w, bits, g))
    np.testing.assert_array_equal(rtn_quantize(w.T, bits, g, axis=1), _rtn_loop(w, bits, g).T)


def test_nearest_setting():
    s = uniform_settings(256)
    assert nearest_setting(s, 2.5).label() == "2-bit g32"
    assert nearest_setting(s, 3.0).label() == "2-bit g16" and nearest_setting(s, 3.0).bpw == 3.0
    two = nearest_setting(s, 2.0)
    assert two.label() == "2-bit g256" and abs(two.bpw - 2.0625) < 1e-12  # per-row scale: 2 + 16/256
    assert all(x.group_size <= 256 for x in s)


@pytest.fixture(scope="module")
def compare_run(hf, texts, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cmp") / "out"
    code = compare.main(base_args(hf[0], out, texts[0], f"--config.eval_text={texts[1]}", "--targets=3.0"))
    assert code == 0
    return json.loads((out / "compare.json").read_text()), out


def test_compare_all_methods(compare_run):
    data, out = compare_run
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"bitsmoe", "rtn", "gptq", "expertwise"}
    assert (out / "compare.md").read_text().count("| 3.00 |") == 4
    assert rows["bitsmoe"]["effective_bpw_experts"] <= 3.0 + 1e-9
    assert rows["expertwise"]["effective_bpw_experts"] <= 3.0 + 1e-9
    for m in ("rtn", "gptq"):
        assert rows[m]["within_tolerance"] and rows[m]["setting"] == "2-bit g16", rows[m]
    assert rows["gptq"]["time_ratio_to_gptq"] == 1.0
    assert all(np.isfinite(r["kl_divergence"]) and r["kl_divergence"] >= -1e-6 for r in rows.values())
    counts = {r["eval_tokens"] for r in rows.values()}
    assert len(counts) == 1  # every method on the same tokens


@pytest.mark.parametrize("method", ["rtn", "gptq", "expertwise"])
def test_quantize_cli_baselines(method, hf, texts, tmp_path):  # noqa: F811
    out = tmp_path / method
    code = quantize.main(base_args(hf[0], out, texts[0], f"--config.method={method}", "--config.budget_bits=3.0",
                                   f"--config.eval_text={texts[1]}"))
    assert code == 0
    rep = read_report(out)
    for k in ("method", "budget_bits", "effective_bpw_experts", "effective_bpw_model", "perplexity_fp",
              "perplexity_q", "kl_divergence", "top1_agreement", "time_s"):
        assert k in rep, k
    assert rep["method"] == method and rep["effective_bpw_experts"] <= 3.0 + 1e-9
    js = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(out), "--text", str(texts[1]), "--seq-len", "64", "--reference", str(hf[0]),
                          "--json", str(js), "--no-progress"]) == 0
    ev = json.loads(js.read_text())
    assert ev["kl_divergence"] == pytest.approx(rep["kl_divergence"], rel=1e-4, abs=1e-7)
