"""Multi-device and multi-process quantization on CPU give the same checkpoint as one device.

Runs of `python -m bitsmoe_jax.quantize` on the shipped reference model — 1 process × 1 device,
1 process × 4 forced host devices, and 2 processes × 2 devices joined through
`jax.distributed.initialize` on localhost — must produce identical allocations and bit-identical
packed arrays: every array file of the output is compared byte for byte, and the allocation part of
the reports field by field — whatever the chunk of experts each device streams at a time. The
reference is the 1-device run, whose per-expert work is the same program on one device (nothing
else in the package reduces over the mesh). The whole-model budget (the default) is compared on
all three meshes in the fixture; per-layer budgets on 2 × 2 through the kill-and-resume test, and
the expert-parallel path (one budget) through the other kill test. The per-layer runs use the
sampled loss tables (`coefficient_mode="sampled"`), whose unit norms each process measures for its
own experts only.

The fixture's runs are short (few calibration tokens, two budgets, no evaluation) and start
concurrently, so it costs about one run's wall time plus JAX start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.helpers import env_with_devices, free_port

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = (
    400  # a hang (a lost peer, a barrier nobody reaches) fails the test instead of blocking CI
)


def quantize_cmd(out: Path, calib: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bitsmoe_jax.quantize",
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.output_dir={out}",
        f"--config.calib_text={calib}",
        "--config.budget_bits=(2.5,3.0)",
        # 4 windows of 64 tokens: ~32 assignments per expert, so min_tokens=24 leaves some experts
        # starved and the all-token fallback is compared too (also in the GPTQ-style rounding, the
        # default); rank 64 (of 256) keeps the run short (the Gram sums and eigendecompositions are
        # still full D×D); two budgets: the second one's layers are packed by every process in turn
        "--config.num_calib_tokens=256",
        "--config.seq_len=64",
        "--config.eval_text=",
        "--config.min_tokens=24",
        "--config.rank=64",
        "--config.allocator=greedy",
        # the per-expert scale fit after rounding runs in every run too: its outputs must be as
        # byte-identical across meshes, processes and chunks as the rounding's
        "--config.scale_tuning_steps=4",
        *extra,
    ]


LOGS: dict[tuple[str, int], str] = {}  # (run, process) -> its output
PER_LAYER = ("--config.budget_scope=layer", "--config.coefficient_mode=sampled")
BUDGETS = ("bpw_2.50", "bpw_3.00")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Output directories of the three runs, started together and awaited with a deadline."""
    tmp = tmp_path_factory.mktemp("multihost")
    calib = tmp / "calib.txt"
    from bitsmoe_jax.io.data import read_text

    calib.write_text(read_text("shakespeare_train")[:20000])
    port = free_port()
    dist = [
        "--config.distributed.num_processes=2",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.initialization_timeout=60",
        "--config.distributed.heartbeat_timeout=60",
        "--config.distributed.barrier_timeout=300",
    ]
    jobs = {
        "1x1": [(quantize_cmd(tmp / "1x1", calib), env_with_devices(1))],
        # streamed: one expert per device at a time (1x4), and chunks of 3 of each device's 4
        # expert slots (2x2: a full round and a short one) — the chunk never changes the output
        "1x4": [(quantize_cmd(tmp / "1x4", calib, "--config.expert_chunk=1"), env_with_devices(4))],
        "2x2": [
            (
                quantize_cmd(
                    tmp / "2x2",
                    calib,
                    "--config.expert_chunk=3",
                    *dist,
                    f"--config.distributed.process_id={i}",
                ),
                env_with_devices(2),
            )
            for i in range(2)
        ],
        # per-layer budgets (budget_scope="layer"; the default is one allocation over all
        # layers, in two passes): one pass, each layer allocated on its own; and the sampled loss
        # tables (each process measures its own experts' unit norms and κ sample rows, shared
        # after the layer's last chunk). Its 2-process counterpart is the kill-and-resume test
        # below, which compares its resumed output to this.
        "1x1l": [(quantize_cmd(tmp / "1x1l", calib, *PER_LAYER), env_with_devices(1))],
    }
    procs = {
        (name, i): subprocess.Popen(
            cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmds in jobs.items()
        for i, (cmd, env) in enumerate(cmds)
    }
    failures = []
    for (name, i), p in procs.items():
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            LOGS[(name, i)] = out
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"run {name} process {i} did not finish in {TIMEOUT_S} s")
        if p.returncode != 0:
            failures.append(f"run {name} process {i} exited {p.returncode}:\n{out[-3000:]}")
    assert not failures, "\n\n".join(failures)
    return {f"{name}/{b}": tmp / name / b for name in jobs for b in BUDGETS}


def array_files(out: Path) -> dict[str, bytes]:
    """Every stored array's chunks and zarr header, by relative path (params/<part>/<array>/<file>),
    and the groups of experts' files (params/layer_<i>_experts/group_<k>.bin/.json).

    Orbax's per-item bookkeeping (`_CHECKPOINT_METADATA` timestamps, `commit_success.txt`) sits one
    level up and is left out.
    """
    return {
        str(f.relative_to(out)): f.read_bytes()
        for f in sorted((out / "params").rglob("*"))
        if f.is_file()
        and (
            len(f.relative_to(out).parts) == 4
            or (f.parent.name.endswith("_experts") and f.name.startswith("group_"))
        )
    }


def allocation_summary(out: Path) -> dict:
    """What the allocation decided, per layer: bits histogram, kept components, objective and
    bound."""
    report = json.loads((out / "report.json").read_text())
    keep = (
        "bits_histogram",
        "kept_components",
        "stored_bits",
        "starved_experts",
        "tokens_per_expert",
        "scale_tuning",  # summed in expert order from the all-gathered records: equal too
    )
    return {
        i: {
            **{k: layer.get(k) for k in keep},
            "allocation": [
                {k: a[k] for k in ("solver", "objective", "lower_bound")}
                for a in layer["allocation"]
            ],
        }
        for i, layer in report["layers"].items()
    } | {"effective_bpw_experts": report["effective_bpw_experts"]}


def test_runs_write_one_checkpoint_each(runs):
    for name, out in runs.items():
        assert (out / "report.json").is_file(), name
        assert not list(out.parent.parent.glob(f"{out.parent.name}.partial*")), (
            f"{name}: work directory left behind"
        )
    layers = json.loads((runs["1x1/bpw_2.50"] / "report.json").read_text())["layers"]
    assert any(layer["starved_experts"] for layer in layers.values()), (
        "the starved-expert fallback went untested"
    )
    # the second budget's layers were spread over both processes of the 2-process run
    assert (
        "budget 3.00: MoE layers packed by 2 processes (process 0: layers [0, 2]; process 1: "
        "layers [1])" in LOGS[("2x2", 0)]
    )
    # the whole-model budget (default) makes its tables first; per-layer budgets need none
    assert "pass 1 of 2 (loss tables): layer 3/3" in LOGS[("2x2", 0)]
    assert "pass 1 of 2" not in LOGS[("1x1l", 0)]
    # two budgets: every process keeps every expert's units, so not expert-parallel
    assert "expert-parallel" not in LOGS[("2x2", 0)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ["1x4", "2x2"])
def test_sharded_runs_bit_identical_to_one_device(runs, name, budget):
    ref, got = array_files(runs[f"1x1/{budget}"]), array_files(runs[f"{name}/{budget}"])
    assert len(ref) > 50 and sorted(ref) == sorted(got)
    differ = [k for k in ref if ref[k] != got[k]]
    assert not differ, (
        f"{name}: {len(differ)} array files differ from the 1-device run, e.g. {differ[:5]}"
    )
    assert allocation_summary(runs[f"{name}/{budget}"]) == allocation_summary(runs[f"1x1/{budget}"])


def start_pair(
    out: Path, calib: Path, cwd: Path, faults: dict[int, str], *extra: str
) -> list[tuple[int, str]]:
    """The two processes of one run (`faults`: BITSMOE_FAULT of a process), awaited with a
    deadline: [(exit code, output)] in process order."""
    port = free_port()
    dist = [
        "--config.distributed.num_processes=2",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.initialization_timeout=60",
        "--config.distributed.heartbeat_timeout=10",
        "--config.distributed.barrier_timeout=120",
    ]
    procs = []
    for i in range(2):
        env = env_with_devices(2) | ({"BITSMOE_FAULT": faults[i]} if i in faults else {})
        cmd = quantize_cmd(out, calib, *extra, *dist, f"--config.distributed.process_id={i}")
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    results = []
    for p in procs:
        try:
            results.append((p.communicate(timeout=TIMEOUT_S)[0], p.returncode))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not finish in {TIMEOUT_S} s (a hang)")
    return [(rc, text) for text, rc in results]


def test_two_process_run_killed_twice_then_resumed(runs, tmp_path):
    """Per-layer budgets (`budget_scope="layer"`, one pass) and sampled loss tables, two budgets,
    2 processes × 2 devices:
    kill -9 of process 1 during the layer pass, then again while it commits a later-budget layer of
    its own; each time process 0 stops with an error instead of hanging. The third start of the same
    two commands resumes and writes the 1-device per-layer run's arrays byte for byte (this is the
    per-layer scope's mesh comparison: the fixture runs only its 1-device reference)."""
    from bitsmoe_jax.io.data import read_text

    calib = tmp_path / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:20000])  # the fixture's text: same fingerprint
    out, work = tmp_path / "2x2l", tmp_path / "2x2l.partial"

    def start(faults: dict[int, str]) -> list[tuple[int, str]]:
        return start_pair(out, calib, tmp_path, faults, *PER_LAYER)

    # process 1 dies after computing layer 1 (its second: per-layer budgets have no tables pass)
    (rc0, log0), (rc1, _) = start({1: "layer_computed:2"})
    assert rc1 == -9 and rc0 != 0, log0[-3000:]
    assert "another process died" in log0 or "heartbeat" in log0.lower(), log0[-3000:]
    assert "pass 1 of 2" not in log0, log0[-3000:]
    assert (work / "layer_000").is_dir() and not out.exists()

    # dies committing its 3.00-budget layer
    (rc0, log0), (rc1, _) = start({1: "commit_before_rename:1"})
    assert rc1 == -9 and rc0 != 0, log0[-3000:]
    assert "budget 3.00: MoE layers packed by 2 processes" in log0, log0[-3000:]
    assert sorted(p.name for p in work.glob("layer_*")) == ["layer_000", "layer_001", "layer_002"]
    assert list(work.glob(".tmp-bpw_3.00_layer_001-*")), (
        "process 1 was killed before renaming its commit"
    )

    (rc0, log0), (rc1, log1) = start({})
    assert rc0 == 0 and rc1 == 0, log0[-3000:] + log1[-3000:]
    assert not work.exists()
    for b in BUDGETS:
        ref, got = array_files(runs[f"1x1l/{b}"]), array_files(out / b)
        assert len(ref) > 50 and sorted(ref) == sorted(got), b
        differ = [k for k in ref if ref[k] != got[k]]
        assert not differ, f"{b}: {len(differ)} array files differ after the resume: {differ[:5]}"
        assert allocation_summary(out / b) == allocation_summary(runs[f"1x1l/{b}"])


def test_expert_parallel_run_killed_then_resumed(runs, tmp_path):
    """One budget, whole-model scope (the default): after the tables pass, each process packs,
    forwards and commits only its own experts (expert-parallel), the next layer's input built from
    rows each process computes for its own. kill -9 of process 1 after it computed layer 1 of the
    second pass (its fifth layer computed; layer 0 committed from both processes' shards, layer
    1's shard of process 0 possibly staged); the rerun skips the tables pass and resumes at layer 1;
    killed again while process 1 writes its groups of experts into the output, then finishing, it
    writes the 1-device run's arrays of that budget byte for byte."""
    from bitsmoe_jax.io.data import read_text

    calib = tmp_path / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:20000])
    out, work = tmp_path / "2x2s", tmp_path / "2x2s.partial"
    one = ("--config.budget_bits=2.5", "--config.expert_chunk=3")
    (rc0, log0), (rc1, _) = start_pair(out, calib, tmp_path, {1: "layer_computed:5"}, *one)
    assert rc1 == -9 and rc0 != 0, log0[-3000:]
    owners = "process 0: experts 0-7; process 1: experts 8-15"
    assert f"commits only its experts ({owners})" in log0, log0[-3000:]
    assert sorted(p.name for p in work.glob("layer_*")) == ["layer_000"]
    assert len(list((work / "layer_000").glob("shard_*.bin"))) == 2
    assert len(list((work / "scope_tables").glob("layer_*"))) == 3
    # process 1 writes its own groups of experts into the output: killed after its second layer's,
    # process 0 stops instead of renaming an incomplete output into place — at the barrier that
    # waits for every process's groups, or earlier, while it writes its own, when the coordination
    # service misses process 1's heartbeats first (which of the two comes first is timing)
    (rc0, log0), (rc1, _) = start_pair(out, calib, tmp_path, {1: "output_groups:2"}, *one)
    assert rc1 == -9 and rc0 != 0, log0[-3000:]
    assert "resuming at layer 2/3" in log0 and "pass 1 of 2" not in log0, log0[-3000:]
    assert f"budget 2.50: writing {out}" in log0, log0[-3000:]
    stopped = ("output_groups_written", "another process died", "stopped sending heartbeats")
    assert any(s in log0 for s in stopped), log0[-3000:]
    assert not out.exists() and work.exists()
    (rc0, log0), (rc1, log1) = start_pair(out, calib, tmp_path, {}, *one)
    assert rc0 == 0 and rc1 == 0, log0[-3000:] + log1[-3000:]
    assert not work.exists()
    # a run of one budget writes its checkpoint into the output directory itself
    ref, got = array_files(runs["1x1/bpw_2.50"]), array_files(out)
    assert len(ref) > 50 and sorted(ref) == sorted(got)
    differ = [k for k in ref if ref[k] != got[k]]
    assert not differ, f"{len(differ)} array files differ from the 1-device run, e.g. {differ[:5]}"
    assert allocation_summary(out) == allocation_summary(runs["1x1/bpw_2.50"])
