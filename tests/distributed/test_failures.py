"""A lost peer or an unreachable coordinator is a clear error within a bounded time, never a hang.

Each case runs real processes joined through `jax.distributed.initialize` on localhost (`peer.py`),
with small timeouts; `subprocess` deadlines turn a hang into a test failure.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.distributed.helpers import env_with_devices, free_port

PEER = Path(__file__).with_name("peer.py")
DEADLINE_S = 60  # far above the 3-6 s timeouts under test: reaching it means something hung


def start(pid: int, port: int, mode: str, timeout_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PEER), str(pid), str(port), mode, str(timeout_s)],
        env=env_with_devices(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_dead_peer_fails_the_barrier_with_its_name():
    port = free_port()
    procs = [start(i, port, "die", 20) for i in range(2)]
    out0 = procs[0].communicate(timeout=DEADLINE_S)[0]
    procs[1].communicate(timeout=DEADLINE_S)
    assert procs[0].returncode == 3, out0[-3000:]
    assert "DistributedError: barrier 'layer_0_committed' (process 0 of 2) failed" in out0, out0[
        -3000:
    ]
    assert "another process died" in out0


def test_unreachable_coordinator_is_named_after_the_timeout():
    port = free_port()  # nobody listens: process 0 never started
    p = start(1, port, "barrier", 3)
    out = p.communicate(timeout=DEADLINE_S)[0]
    assert p.returncode == 3, out[-3000:]
    assert f"DistributedError: coordinator localhost:{port} unreachable for 3 s" in out, out[-3000:]
    assert "initialization_timeout" in out


def test_processes_on_one_host_agree_on_their_share_and_chunk():
    """Both processes of a localhost run see 2 processes on this host (each plans with half its
    memory) and the same, smallest, chunk (rounds are collective)."""
    port = free_port()
    procs = [start(i, port, "exchange", 20) for i in range(2)]
    outs = [p.communicate(timeout=DEADLINE_S)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out[-3000:]
        assert f"process {i}: 2 on this host, min 10" in out, out[-3000:]
