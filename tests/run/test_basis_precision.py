"""The bases' precision chosen per layer by the allocation (`basis_bits_choices`), end to end on the
tiny Hugging Face Mixtral, against runs at each fixed precision.

Independent references: each candidate's predicted loss is the objective the allocator reports in
the run fixed at that precision; the chosen precision is the least of them; the chosen layer's
stored arrays are the fixed run's at that precision, byte for byte (while the layers before it
chose alike, so that it saw the same calibration input).
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.io.checkpoint import load_tree
from tests.run.tiny_mixtral import LAYERS, base_args, read_report


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def test_basis_precision_is_the_least_predicted_loss(hf, texts, tmp_path):
    common = ["--config.budget_bits=2.0", "--config.eval_text=", "--config.allocator=greedy"]
    common.append("--config.budget_scope=layer")  # the choice is per layer: compared per layer
    runs = {
        "4": ["--config.basis_bits=4"],
        "8": ["--config.basis_bits=8"],
        # 16-bit bases alone cost 2 bits per expert weight at these dims: never feasible at 2.0
        "choice": ["--config.basis_bits_choices=(8,16,4)"],
    }
    reports = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert quantize.main(base_args(hf[0], out, texts[0], *common, *extra)) == 0
        reports[name] = read_report(out)
    # the fixed runs whose layers so far stored what the choosing run stored: layer i's calibration
    # input (the quantized layers before it) is then the same in both
    same_so_far = {"4", "8"}
    compared = 0
    for i in range(LAYERS):
        layer = reports["choice"]["layers"][str(i)]
        losses = layer["basis_choice"]["predicted_loss"]
        assert set(losses) == {"4", "8"}
        for b in same_so_far:
            fixed = reports[b]["layers"][str(i)]
            assert fixed["basis_bits"] == int(b) and "basis_choice" not in fixed
            assert losses[b] == pytest.approx(fixed["allocation"][0]["objective"], rel=1e-9)
            compared += 1
        want = min(losses, key=lambda b: (losses[b], int(b)))
        assert layer["basis_bits"] == int(want)
        if want in same_so_far:
            got = _flat(load_tree(tmp_path / "choice" / "params" / f"layer_{i:03d}"))
            ref = _flat(load_tree(tmp_path / want / "params" / f"layer_{i:03d}"))
            assert got.keys() == ref.keys()
            for k in got:
                assert got[k].dtype == ref[k].dtype and got[k].tobytes() == ref[k].tobytes(), k
        same_so_far &= {want}
    assert compared >= 3  # both candidates at layer 0, the chosen one at layer 1
    # what every budget is charged: the chosen bases at their stored bits
    assert 0.9 * 2.0 < reports["choice"]["effective_bpw_experts"] <= 2.0


def test_choices_all_over_the_budget_name_the_cheapest_minimum(hf, texts, tmp_path, capsys):
    """Every candidate's bases alone exceed the budget: the error is the cheapest candidate's (8-bit
    bases: 1 bit per expert weight at these dims, plus permutations), and nothing is written."""
    out = tmp_path / "out"
    code = quantize.main(
        base_args(
            hf[0],
            out,
            texts[0],
            "--config.budget_bits=0.5",
            "--config.eval_text=",
            "--config.basis_bits_choices=(16,8)",
        )
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "budget 0.5" in err and "minimum of 1." in err, err
    assert not out.exists()
