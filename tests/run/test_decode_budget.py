"""A decode budget end to end (`budget_counts="decode"`) on the tiny Hugging Face Mixtral.

Independent reference: the bytes a batch-1 decode step reads per token under uniform routing,
recounted here from the written array files alone — every basis array whole, plus k/E of every
factor array (payload words, bf16 scales, int32 permutation) — against what the budget allows:
budget_bits × the k routed experts' weights, summed over the MoE layers (one whole-model budget).
"""

from __future__ import annotations

import numpy as np

from bitsmoe_jax import quantize
from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.checkpoint import load_tree
from tests.run.tiny_mixtral import LAYERS, D, E, F, base_args, read_report

TOP_K = 2  # the fixture's num_experts_per_tok


def _nbytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    return np.asarray(tree).nbytes


def test_decode_budget_bounds_the_bytes_a_token_reads(hf, texts, tmp_path):
    out = tmp_path / "out"
    budget = 2.0
    args = [
        f"--config.budget_bits={budget}",
        "--config.budget_counts=decode",
        "--config.eval_text=",
    ]
    assert quantize.main(base_args(hf[0], out, texts[0], *args)) == 0
    report = read_report(out)
    allowed = budget * TOP_K * 3 * D * F / 8  # a layer's share; the budget is the model's
    reads = []
    for i in range(LAYERS):
        experts_q = load_tree(out / "params" / f"layer_{i:03d}")["experts_q"]
        bases = _nbytes(experts_q["basis"])
        groups = out / "params" / f"layer_{i:03d}_experts"
        factors = _nbytes(experts_q["factors"]) + sum(  # permutations + the groups' rows
            _nbytes(arrayfile.load(groups, g.stem)[0]) for g in groups.glob("group_*.json")
        )
        read = bases + TOP_K / E * factors
        reads.append(read)
        layer = report["layers"][str(i)]
        assert layer["decode_bytes_per_token"]["1"]["bitsmoe"] == read
        # the bases are cut to what their read cost buys: fewer than full rank somewhere
        assert min(layer["kept_components"].values()) < D
    # within the budget over the model's MoE layers (the default whole-model scope), and the
    # budget used (the allocation fills it to a few units)
    assert 0.95 * LAYERS * allowed <= sum(reads) <= LAYERS * allowed, (reads, allowed)
    # what is stored is below the budget too (each basis bit counted E/k times)
    assert report["effective_bpw_experts"] < budget
    assert report["budget_counts"] == "decode"
