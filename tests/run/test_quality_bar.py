"""The quantizer's quality bar on the shipped reference model (test split, bases counted).

- At 2.0 effective bpw, KL to the unquantized model ≤ 1.5× that of uniform 3-bit RTN (g128,
  3.125 bpw) with the default expert_mass_floor, and below it with the floor at 0.
- The SVD basis pays for itself: at the same stored bits, BitsMoE beats the same allocation applied
  to the original weight columns without any basis.
- At 2.0 bpw, BitsMoE's KL is below that of llama.cpp's smallest K-quant (Q2_K with an imatrix from
  the same calibration, 2.625 bpw), written and evaluated through the quantize CLI's baseline path.

Measured on a slice of the test split so CI stays fast; the README table uses the whole split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bitsmoe_jax.baselines.rtn import apply_rtn
from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.run.baseline_driver import quantize_baseline
from bitsmoe_jax.run.config_schema import default_config, run_config
from bitsmoe_jax.run.driver import quantize

MODEL = Path(os.environ.get("BITSMOE_TEST_MODEL") or REFERENCE_DIR)
EVAL_TOKENS = 16384
SEQ = 256


@pytest.fixture(scope="module")
def eval_tokens() -> np.ndarray:
    return tokenize_text(load_tokenizer(MODEL), read_text("shakespeare_test"))[:EVAL_TOKENS]


def _bitsmoe(tmp_path_factory, name: str, method: str = "bitsmoe", **overrides) -> dict:
    c = default_config()
    c.method = method
    c.model_path = str(MODEL)
    c.output_dir = str(tmp_path_factory.mktemp("q") / name)
    c.budget_bits = (2.0,)
    c.num_calib_tokens = 4096
    c.seq_len = SEQ
    c.eval_max_tokens = EVAL_TOKENS
    for k, v in overrides.items():
        c[k] = v
    run = run_config(c)
    (report,) = (
        quantize(run, progress=False)
        if method == "bitsmoe"
        else quantize_baseline(run, progress=False)
    )
    return report


@pytest.fixture(scope="module")
def results(tmp_path_factory, eval_tokens) -> dict[str, dict]:
    out = {
        "floor_default": _bitsmoe(tmp_path_factory, "floor_default"),
        "floor_0": _bitsmoe(tmp_path_factory, "floor_0", expert_mass_floor=0.0),
        "no_basis": _bitsmoe(tmp_path_factory, "no_basis", basis="none"),
        "q2_k": _bitsmoe(tmp_path_factory, "q2_k", method="kquant", budget_bits=(2.5,)),
    }
    ref, _ = load_model(MODEL)
    rtn, _ = load_model(MODEL)
    bpw = apply_rtn(rtn, bits=3, group_size=128)
    r = evaluate_model(rtn, eval_tokens, SEQ, SEQ, batch_size=8, reference=ref)
    out["rtn3"] = {
        "kl_divergence": r["kl_divergence"],
        "effective_bpw_experts": bpw,
        "eval_tokens": r["tokens_scored"],
    }
    for k, v in out.items():
        print(f"{k:14s} bpw {v['effective_bpw_experts']:.3f}  KL {v['kl_divergence']:.4f}")
    return out


def test_same_evaluation_tokens(results):
    counts = {v["eval_tokens"] for v in results.values()}
    assert len(counts) == 1, counts


def test_two_bits_below_llama_cpp_q2_k(results):
    q2k = results["q2_k"]
    assert q2k["setting"] == "Q2_K imatrix" and q2k["effective_bpw_experts"] == 2.625
    kl = results["floor_default"]["kl_divergence"]
    assert kl < q2k["kl_divergence"], (
        f"BitsMoE 2.0 bpw KL {kl:.4f} >= Q2_K (2.625 bpw) KL {q2k['kl_divergence']:.4f}"
    )


def test_budget_respected_with_bases_counted(results):
    for name in ("floor_default", "floor_0", "no_basis"):
        assert results[name]["effective_bpw_experts"] <= 2.0 + 1e-9, (
            name,
            results[name]["effective_bpw_experts"],
        )
        assert results[name]["effective_bpw_experts"] > 1.9, (
            name,
            results[name]["effective_bpw_experts"],
        )


def test_two_bits_within_1_5x_of_three_bit_rtn(results):
    kl, rtn = results["floor_default"]["kl_divergence"], results["rtn3"]["kl_divergence"]
    assert kl <= 1.5 * rtn, f"BitsMoE 2.0 bpw KL {kl:.4f} > 1.5 x RTN 3-bit KL {rtn:.4f}"


def test_two_bits_floor_zero_below_three_bit_rtn(results):
    kl, rtn = results["floor_0"]["kl_divergence"], results["rtn3"]["kl_divergence"]
    assert kl < rtn, f"BitsMoE 2.0 bpw (floor 0) KL {kl:.4f} >= RTN 3-bit KL {rtn:.4f}"


def test_svd_basis_pays_for_itself(results):
    with_basis, without = (
        results["floor_default"]["kl_divergence"],
        results["no_basis"]["kl_divergence"],
    )
    assert with_basis < without, (
        f"with basis KL {with_basis:.4f} not below no-basis KL {without:.4f}"
    )
