"""A process of a 2-process test run: `python peer.py PROCESS_ID PORT MODE [TIMEOUT_S]`.

MODE "barrier": join, then wait at barriers "after_join" and "layer_0_committed" (a 3 s deadline).
MODE "die": join, pass "after_join", then exit at once (a crashed or preempted host).
MODE "exchange": join, then print how many processes share this host and the smallest of every
process's 10 + PROCESS_ID (the memory plan's two collectives).
Exit status 0 on success; a DistributedError is printed with its message and exits 3.
"""

from __future__ import annotations

import os
import sys

from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.config_schema import default_config


def main() -> int:
    pid, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 20.0
    cfg = default_config()
    d = cfg.distributed
    d.num_processes, d.process_id, d.coordinator_address = 2, pid, f"localhost:{port}"
    d.initialization_timeout, d.heartbeat_timeout, d.barrier_timeout = (
        int(timeout),
        int(timeout),
        timeout,
    )
    try:
        distributed.initialize(distributed.DistributedConfig(**cfg.distributed.to_dict()))
        distributed.barrier("after_join")
        if mode == "exchange":
            hosts = distributed.processes_on_this_host()
            low = distributed.min_over_processes("chunk", 10 + pid)
            print(f"process {pid}: {hosts} on this host, min {low}", flush=True)
        if mode == "die" and pid == 1:
            os._exit(0)  # no shutdown, no goodbye: the coordinator only sees its heartbeats stop
        distributed.barrier("layer_0_committed", timeout_s=3.0)
    except distributed.DistributedError as e:
        print(f"DistributedError: {e}", flush=True)
        os._exit(3)  # skip JAX's exit-time shutdown barrier: the peer it would wait for is gone
    print(f"process {pid} passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
