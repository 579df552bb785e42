"""Resumable quantization: `kill -9` anywhere, rerun, and the output is byte-identical.

The model is a random Mixtral written here (`conversion.synthetic`: 4 layers, hidden 64, 8 experts
of width 256, bf16, several shards) and quantized at two budgets, so that every kind of
work-directory state is exercised: dense params, packed first-budget layers, spilled problems for
the second budget.

The reference is an uninterrupted run of the same command into the same path (the config, output
path included, is recorded in `quantized.json`). Interrupted runs are subprocesses killed by
SIGKILL, either by the fault-injection points of `bitsmoe_jax.run.faults` (at named places:
mid-layer, between a commit's write and its rename, right after a commit, while an output is half
written, after an output's rename) or from outside at a random instant. Every output file is
compared byte for byte with the reference, except `timings.json` (run timings, kept out of the
reports for this reason) and orbax's own `_CHECKPOINT_METADATA` (timestamps) and
`commit_success.txt` (the temporary path).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.config_cli import parse_config_args
from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.data import read_text
from bitsmoe_jax.loading import model_config
from bitsmoe_jax.run import fingerprint
from bitsmoe_jax.run.config_schema import run_config
from bitsmoe_jax.run.driver import quantize as quantize_run
from bitsmoe_jax.run.progress import LayerProgress, format_duration
from bitsmoe_jax.run.workdir import WorkDir
from conversion.synthetic import write_random_mixtral

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 3
NOT_COMPARED = {"_CHECKPOINT_METADATA", "commit_success.txt", "timings.json"}


def args_for(model: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.model_path={model}",
        f"--config.output_dir={out}",
        "--config.budget_bits=(2.0,3.0)",
        "--config.eval_text=",
        "--config.allocator=greedy",
        f"--config.calib_text={calib}",
        "--config.num_calib_tokens=256",
        "--config.seq_len=64",
        # the fault counts below are of the one layer pass; the whole-model budget's two passes
        # are killed and resumed in test_model_scope.py
        "--config.budget_scope=layer",
        *extra,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model, calibration text, and the reference output of an uninterrupted run (moved to
    `ref`)."""
    base = tmp_path_factory.mktemp("resume")
    model = write_random_mixtral(base / "model", LAYERS, 64, 256, 8, shard_bytes=400_000, seed=1)
    calib = base / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:20000])
    out = base / "q"
    assert quantize.main(args_for(model, out, calib)) == 0
    assert not (base / "q.partial").exists(), "the work directory is removed after a successful run"
    out.rename(base / "ref")
    return {
        "base": base,
        "model": model,
        "calib": calib,
        "out": out,
        "ref": base / "ref",
        "work": base / "q.partial",
    }


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def assert_identical(out: Path, ref: Path) -> None:
    files = all_files(ref)
    assert all_files(out) == files, "different file sets"
    compared = 0
    for f in files:
        if Path(f).name in NOT_COMPARED:
            continue
        assert (out / f).read_bytes() == (ref / f).read_bytes(), (
            f"{f} differs from the uninterrupted run"
        )
        compared += 1
    assert (
        compared > 100
    )  # zarr chunks and metadata of every layer, both budgets, reports, tokenizer


def run_killed(setup, fault: str) -> None:
    """Run the CLI in a subprocess that SIGKILLs itself at the fault point."""
    env = {**os.environ, "BITSMOE_FAULT": fault}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bitsmoe_jax.quantize",
            *args_for(setup["model"], setup["out"], setup["calib"]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"{fault}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    )


def committed(work: Path) -> list[str]:
    return sorted(p.name for p in work.glob("layer_*"))


def fresh(setup) -> None:
    shutil.rmtree(setup["out"], ignore_errors=True)
    shutil.rmtree(setup["work"], ignore_errors=True)


def test_kill_at_named_points_then_resume(setup):
    fresh(setup)
    out, work = setup["out"], setup["work"]
    run_killed(setup, "layer_computed:2")  # layer 1 computed, not committed
    assert committed(work) == ["layer_000"] and not out.exists()
    run_killed(
        setup, "commit_before_rename:1"
    )  # resumes at layer 1; killed between its write and rename
    assert committed(work) == ["layer_000"] and list(work.glob(".tmp-layer_001-*"))
    run_killed(
        setup, "layer_committed:2"
    )  # resumes at layer 1 again; killed right after committing layer 2
    assert committed(work) == ["layer_000", "layer_001", "layer_002"] and not list(
        work.glob(".tmp-*")
    )
    run_killed(
        setup, "output_write:2"
    )  # all layers committed: killed with the first output half written
    assert (
        committed(work) == [f"layer_{i:03d}" for i in range(LAYERS)]
        and not (out / "bpw_2.00").exists()
    )
    assert list(out.glob(".bpw_2.00.tmp-*")), "the half-written output is left by the kill"
    run_killed(setup, "output_renamed:1")  # first output in place, not yet recorded as done
    assert (out / "bpw_2.00").is_dir() and not (out / "bpw_3.00").exists()
    run_killed(setup, "cleanup:2")  # both outputs written and recorded; the work dir half deleted
    assert (
        (out / "bpw_3.00").is_dir()
        and (work / "outputs").is_dir()
        and committed(work) == ["layer_002"]
    )
    run_killed(
        setup, "tombstone:1"
    )  # the work dir renamed to its tombstone; pareto.md not yet written
    tombs = list(out.parent.glob(f".{work.name}.deleted-*"))
    assert not work.exists() and len(tombs) == 1 and not (out / "pareto.md").exists()
    # every output is in place and its own: the rerun only finishes the cleanup and the Pareto table
    assert quantize.main(args_for(setup["model"], out, setup["calib"])) == 0
    assert not work.exists() and not tombs[0].exists()
    assert_identical(out, setup["ref"])
    # ... while outputs of another run (here another evaluation text) still need --config.overwrite
    with pytest.raises(FileExistsError, match="bpw_2.00: output exists"):
        quantize_run(
            run_config(
                parse_config_args(
                    args_for(setup["model"], out, setup["calib"], "--config.eval_max_tokens=64")
                )[0]
            ),
            progress=False,
        )


def test_random_sigkill_then_resume(setup):
    fresh(setup)
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 4.0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bitsmoe_jax.quantize",
            *args_for(setup["model"], setup["out"], setup["calib"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:  # a random instant once the layers are under way
        if line.startswith(f"layer 1/{LAYERS} done"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    rc = proc.wait()
    if (
        rc == -signal.SIGKILL
    ):  # (rc 0: the run finished before the signal; its output is compared as is)
        assert quantize.main(args_for(setup["model"], setup["out"], setup["calib"])) == 0
    assert not setup["work"].exists()
    (
        assert_identical(setup["out"], setup["ref"]),
        f"random kill {delay:.2f} s after layer 1 (seed {seed})",
    )


def test_changed_model_config_or_text_refuses_to_resume(setup, tmp_path, capsys):
    """A work dir from another model / config / calibration text is refused, naming what changed."""
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    calib = tmp_path / "calib.txt"
    shutil.copy(setup["calib"], calib)
    out = tmp_path / "q"
    args = args_for(model, out, calib)
    cfg, _ = parse_config_args(args)
    WorkDir(tmp_path / "q.partial").open(
        fingerprint.compute(cfg, model_config(model)), True, fingerprint.describe_changes
    )

    def refused(*extra: str) -> str:
        assert quantize.main(args + list(extra)) == 2
        err = capsys.readouterr().err
        assert (
            f"cannot resume from {tmp_path / 'q.partial'}" in err and "--config.resume=False" in err
        ), err
        return err

    assert "config field group_size (128 → 64)" in refused("--config.group_size=64")
    calib.write_text(calib.read_text() + "\nOne more line.\n")
    assert "calibration text content (sha256" in refused()
    shutil.copy(setup["calib"], calib)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor
    shard.write_bytes(bytes(data))
    assert f"model: file {shard.name} changed content" in refused()
    # the way out the message names: start fresh
    assert quantize.main(args + ["--config.resume=False"]) == 0
    assert (out / "bpw_2.00" / "quantized.json").is_file() and not (tmp_path / "q.partial").exists()


def test_array_files_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "a": {
            "w": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
            "empty": np.zeros((4, 0), np.float32),
        },
        "b": rng.integers(-9, 9, (7,), dtype=np.int8),
        "c": {"d": {"e": rng.standard_normal(11)}},
    }
    arrayfile.save(tmp_path, "t", tree, extra={"k": [1, 2]})
    for mmap in (False, True):
        back, extra = arrayfile.load(tmp_path, "t", mmap=mmap)
        assert extra == {"k": [1, 2]}
        flat, flat_back = dict(arrayfile.flatten(tree)), dict(arrayfile.flatten(back))
        assert flat.keys() == flat_back.keys()
        for k, v in flat.items():
            assert (
                flat_back[k].dtype == v.dtype
                and flat_back[k].shape == v.shape
                and flat_back[k].tobytes() == v.tobytes()
            ), k
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="truncated"):
        arrayfile.load(tmp_path, "t")


def test_progress_lines_and_eta():
    lines: list[str] = []
    bar = LayerProgress(4, 0, tty=False, emit=lines.append)
    bar.layer_done(0, 10.0, {"basis": 3.0, "pack": 0.0})
    bar.layer_done(1, 20.0, {})
    bar.layer_done(2, 10.0, {"calibration": 1.25})
    bar.layer_done(3, 1.0, {})
    assert lines == [
        "layer 1/4 done in 10.0 s (basis 3.0 s) — ETA 30 s",  # 10 s × 3 layers left
        "layer 2/4 done in 20.0 s — ETA 30 s",  # mean 15 s × 2
        "layer 3/4 done in 10.0 s (calibration 1.2 s) — ETA 13 s",  # mean 13.3 s × 1
        "layer 4/4 done in 1.0 s",
    ]
    resumed: list[str] = []
    LayerProgress(32, 5, tty=False, emit=resumed.append).layer_done(5, 120.0, {})
    assert resumed == [
        "resuming at layer 6/32 (5 layers already committed)",
        "layer 6/32 done in 120.0 s — ETA 52 min",
    ]
    assert [format_duration(s) for s in (42, 600, 7500)] == ["42 s", "10 min", "2 h 05 min"]
