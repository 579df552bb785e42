"""The whole-model budget's two passes (`run/model_scope.py`) end to end: what the work directory
holds between them, resume after `kill -9` in either pass, and the budget kept over the model.

The reference is an uninterrupted run of the same command (a random 3-layer Mixtral written here,
as in `test_resume.py`); killed runs are subprocesses that SIGKILL themselves at a named point
(`run/faults.py`) and are rerun to the end, and every output file is compared byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.data import read_text
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.run.model_scope import AUTO_MAX_UNITS, resolve_scope
from conversion.synthetic import write_random_mixtral

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 3
NOT_COMPARED = {"_CHECKPOINT_METADATA", "commit_success.txt", "timings.json"}


def args_for(model: Path, out: Path, calib: Path) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.model_path={model}",
        f"--config.output_dir={out}",
        "--config.budget_bits=2.0",
        "--config.budget_scope=model",
        "--config.eval_text=",
        "--config.allocator=greedy",
        f"--config.calib_text={calib}",
        "--config.num_calib_tokens=256",
        "--config.seq_len=64",
        "--config.scale_tuning_steps=4",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("model_scope")
    model = write_random_mixtral(base / "model", LAYERS, 64, 256, 8, shard_bytes=400_000, seed=3)
    calib = base / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:20000])
    # written where the killed runs write (the output path is part of quantized.json), then moved
    assert quantize.main(args_for(model, base / "q", calib)) == 0
    (base / "q").rename(base / "ref")
    return {"base": base, "model": model, "calib": calib, "ref": base / "ref"}


def run_killed(setup, out: Path, fault: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitsmoe_jax.quantize",
            *args_for(setup["model"], out, setup["calib"]),
        ],
        env={**os.environ, "BITSMOE_FAULT": fault},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"{fault}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    )
    return proc.stdout + proc.stderr


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layers_share_one_budget_and_differ(setup):
    """The budget is the model's: the MoE layers' stored bits sum to at most the budget over all
    expert weights (and use nearly all of it), while the layers' own bits per weight differ."""
    report = json.loads((setup["ref"] / "report.json").read_text())
    layers = report["layers"]
    assert len(layers) == LAYERS
    stored = sum(v["stored_bits"] for v in layers.values())
    weights = sum(v["num_weights"] for v in layers.values())
    assert stored == report["expert_stored_bits"]
    assert 0.99 * 2.0 * weights <= stored <= 2.0 * weights
    bpw = [v["bpw"] for v in layers.values()]
    assert max(bpw) - min(bpw) > 0.01, bpw


def test_kill_in_either_pass_then_resume_byte_identical(setup):
    out = setup["base"] / "q"
    work = setup["base"] / "q.partial"
    tables = work / "scope_tables"
    # pass 1 killed right after its second layer's commit: loss tables only, nothing packed
    log = run_killed(setup, out, "layer_committed:2")
    assert "pass 1 of 2" in log
    assert sorted(p.name for p in tables.glob("layer_*")) == ["layer_000", "layer_001"]
    assert not list(work.glob("layer_*")), "the layer pass has not started"
    for d in tables.glob("layer_*"):
        names = {p.name for p in d.iterdir()}
        assert "units" not in names and "packed.json" not in names, names
        tree, extra = arrayfile.load(d, "problem")
        assert extra["units_kept"] is False
        assert "calib" not in tree  # the calibration activations are not kept either
    # resumed: pass 1's last layer, the allocation, then pass 2 killed after its second layer
    log = run_killed(setup, out, "layer_committed:3")
    assert "pass 2 of 2" in log
    assert sorted(p.name for p in work.glob("layer_*")) == ["layer_000", "layer_001"]
    assert list(work.glob("bpw_2.00_model_allocation"))
    for d in work.glob("layer_*"):
        names = {p.name for p in d.iterdir()}
        assert "packed.json" in names and "problem.json" not in names, names  # one budget
    assert quantize.main(args_for(setup["model"], out, setup["calib"])) == 0
    assert not work.exists()
    ref = setup["ref"]
    assert files(out) == files(ref)
    compared = 0
    for f in files(ref):
        if Path(f).name not in NOT_COMPARED:
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f
            compared += 1
    assert compared > 20


@pytest.mark.parametrize(
    "name, layers, experts, hidden, units",
    [
        ("shipped", 3, 16, 256, 3 * 16 * 3 * 256),
        ("Mixtral-8x7B", 32, 8, 4096, 3_145_728),
        ("Qwen3-30B-A3B", 48, 128, 2048, 37_748_736),
        ("DeepSeek-V3", 58, 256, 7168, 319_291_392),
    ],
)
def test_auto_scope_by_the_units_of_the_one_allocation(name, layers, experts, hidden, units):
    """`auto` is the whole-model budget while its allocation's units (every MoE layer's experts ×
    3 projections × full-rank components, counted by hand above) stay within the cap; configured
    scopes pass through."""
    config = types.SimpleNamespace(
        hidden_size=hidden, num_experts=experts, moe_layers=list(range(layers))
    )
    scope, why = resolve_scope("auto", MethodConfig(), config)
    assert scope == ("model" if units <= AUTO_MAX_UNITS else "layer"), why
    assert f"{units:,}" in why
    assert scope == ("model" if name in ("shipped", "Mixtral-8x7B") else "layer")
    for fixed in ("model", "layer"):
        assert resolve_scope(fixed, MethodConfig(), config)[0] == fixed
