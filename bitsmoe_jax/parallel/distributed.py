"""Multi-process JAX for quantization runs: start-up, who logs and writes, barriers, the mesh.

Everything here is JAX's own machinery — `jax.distributed.initialize` (its coordination service does
the rendezvous and the heartbeats; collectives go through XLA: gloo on CPU, NCCL on GPU, ICI on TPU)
— wrapped so a run never hangs silently:

* `initialize(d)` turns a `DistributedConfig` (`config.distributed`) into one
  `jax.distributed.initialize` call with bounded timeouts, and turns "coordinator unreachable" into
  a `DistributedError` naming the address and the timeout. On a TPU pod
  `config.distributed.auto=True` lets JAX read the topology from the TPU metadata.
* `barrier(name)` waits on the coordination service's barrier with a deadline; a peer that died or
  hangs gives a `DistributedError` naming the barrier instead of a hang. A peer that dies *inside* a
  collective is caught by the coordination service's heartbeat
  (`config.distributed.heartbeat_timeout` seconds), which stops the survivors with an error naming
  the missing task.
* `is_writer()` is True on process 0 only: one writer for every file; `log` prints on process 0
  only.
* `make_mesh(mesh_shape)` builds the one-axis ("expert") mesh that the per-expert work is sharded
  over.

A single-process run (the default config) does not touch `jax.distributed` at all.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

EXPERT_AXIS = "expert"

# Set by `initialize`: whether this module started the distributed runtime, and the default barrier
# deadline taken from the config (a barrier follows every layer commit, and the last one waits while
# process 0 writes and evaluates every output, so the default is generous; a dead peer fails a
# barrier sooner, once the coordination service misses its heartbeats).
_STATE: dict[str, Any] = {"initialized": False, "barrier_timeout_s": 7200.0, "barrier_count": 0}


class DistributedError(RuntimeError):
    """A multi-process failure: unreachable coordinator, a barrier deadline passed, a bad mesh
    shape."""


def _client() -> Any:
    """The coordination-service client of this process, or None in a single-process run."""
    try:
        from jax._src import distributed as _dist
    except ImportError:  # pragma: no cover - JAX always ships it; guard against a future move
        return None
    return getattr(_dist.global_state, "client", None)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` settings; the defaults are one process (`config.distributed.*`
    on the command line, where each field's help is)."""

    auto: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    initialization_timeout: float = 300
    heartbeat_timeout: float = 100
    barrier_timeout: float = 7200.0


def initialize(d: DistributedConfig) -> None:
    """Start the multi-process runtime from `d`; idempotent; a no-op for one process.

    Must run before any other JAX call touches devices: JAX fixes the device list on first use.
    Fields: `auto` (TPU pod / SLURM / Open MPI: JAX detects everything), `coordinator_address`
    ("host:port" of process 0), `num_processes`, `process_id`, `initialization_timeout` (seconds to
    wait for every process to join), `heartbeat_timeout` (seconds after which a silent peer is
    declared dead), `barrier_timeout` (default deadline of `barrier`).
    """
    _STATE["barrier_timeout_s"] = float(d.barrier_timeout)
    if _STATE["initialized"] or _client() is not None:
        _STATE["initialized"] = True
        return
    if not d.auto and int(d.num_processes) <= 1:
        return
    kwargs: dict[str, Any] = {
        "initialization_timeout": int(d.initialization_timeout),
        "heartbeat_timeout_seconds": int(d.heartbeat_timeout),
        # at exit every process waits for the others in a shutdown barrier: bounded like the rest
        "shutdown_timeout_seconds": int(d.heartbeat_timeout),
    }
    if not d.auto:
        if not d.coordinator_address:
            raise DistributedError(
                f"config.distributed.num_processes={d.num_processes} needs "
                "config.distributed.coordinator_address "
                "(host:port of process 0), or config.distributed.auto=True on a TPU pod / SLURM / "
                "Open MPI"
            )
        kwargs.update(
            coordinator_address=str(d.coordinator_address),
            num_processes=int(d.num_processes),
            process_id=int(d.process_id),
        )
    where = "auto-detected cluster" if d.auto else f"coordinator {d.coordinator_address}"
    t0 = time.monotonic()
    if not d.auto and int(d.process_id) != 0:
        # JAX aborts the process (a C++ fatal log, no Python exception) when the coordinator cannot
        # be reached; probing the port first turns the common case into an error naming the address.
        _wait_for_coordinator(str(d.coordinator_address), float(d.initialization_timeout))
        kwargs["initialization_timeout"] = max(
            1, int(d.initialization_timeout - (time.monotonic() - t0))
        )
    try:
        _initialize_jax(kwargs)
    except Exception as e:  # JaxRuntimeError / XlaRuntimeError: types differ between JAX versions
        raise DistributedError(
            f"jax.distributed.initialize failed after {time.monotonic() - t0:.0f} s ({where}, "
            f"config.distributed.initialization_timeout={d.initialization_timeout}): is process 0 "
            "running and the "
            f"address reachable from this host, and did every one of the {d.num_processes} "
            f"processes start? ({e})"
        ) from e
    _STATE["initialized"] = True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once `address` ("host:port") accepts TCP connections; DistributedError after
    `timeout_s`.

    Process 0 may start a little after the others, so a refused connection is retried until the
    deadline, not failed at once.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(
            f"config.distributed.coordinator_address={address!r} is not host:port"
        )
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(
                (host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)
            ):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(
        f"coordinator {address} unreachable for {timeout_s:g} s "
        "(config.distributed.initialization_timeout): "
        f"start process 0 (process_id=0) first and check the address, port and firewall ({last})"
    )


def _initialize_jax(kwargs: dict[str, Any]) -> None:
    """`jax.distributed.initialize`, dropping keyword arguments an older JAX does not know."""
    import inspect

    params = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in params})


def process_index() -> int:
    return int(jax.process_index())


def process_count() -> int:
    return int(jax.process_count())


def is_writer() -> bool:
    """True on process 0 only: the one process that writes files."""
    return process_index() == 0


def _print_line(msg: str) -> None:
    print(msg, flush=True)


# Where `log` lines go: stdout, or (while a progress bar is on the terminal) a writer that clears
# the bar, prints the line and redraws the bar (`run.progress.LayerProgress`).
_log_writer: Callable[[str], None] = _print_line


def set_log_writer(writer: Callable[[str], None] | None) -> Callable[[str], None]:
    """Send `log` lines to `writer` (None: back to stdout); returns the previous writer."""
    global _log_writer
    previous, _log_writer = _log_writer, writer or _print_line
    return previous


def log(msg: str) -> None:
    """Print on process 0 only (the other processes do the same work; their lines would repeat
    it)."""
    if is_writer():
        _log_writer(msg)


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process reaches the barrier `name`; a DistributedError naming it on timeout.

    Every process must call the same barriers in the same order (the name gets a sequence number so
    a barrier reused per layer stays distinct). No-op in a single-process run.
    """
    client = _client()
    if client is None or process_count() <= 1:
        return
    timeout = _STATE["barrier_timeout_s"] if timeout_s is None else float(timeout_s)
    _STATE["barrier_count"] += 1
    barrier_id = f"bitsmoe:{name}:{_STATE['barrier_count']}"
    t0 = time.monotonic()
    try:
        client.wait_at_barrier(barrier_id, max(1, int(timeout * 1000)))
    except Exception as e:
        raise DistributedError(
            f"barrier {name!r} (process {process_index()} of {process_count()}) failed after "
            f"{time.monotonic() - t0:.1f} s (timeout {timeout:g} s): another process died, hung or "
            "is on a "
            f"different step; check every process's log ({e})"
        ) from e


def _exchange(name: str, value: str) -> list[str]:
    """Every process's `value` for the exchange `name`, in process order, through the coordination
    service's key-value store (bounded by the barrier timeout, like `barrier`). Every process must
    make the same exchanges in the same order; `[value]` in a single-process run."""
    client = _client()
    if client is None or process_count() <= 1:
        return [value]
    _STATE["exchange_count"] = _STATE.get("exchange_count", 0) + 1
    prefix = f"bitsmoe:{name}:{_STATE['exchange_count']}"
    client.key_value_set(f"{prefix}:{process_index()}", value)
    timeout_ms = max(1, int(_STATE["barrier_timeout_s"] * 1000))
    out = []
    for i in range(process_count()):
        try:
            out.append(str(client.blocking_key_value_get(f"{prefix}:{i}", timeout_ms)))
        except Exception as e:
            raise DistributedError(
                f"exchange {name!r}: process {i}'s value did not arrive (process {process_index()} "
                f"of {process_count()}): another process died, hung or is on a different step ({e})"
            ) from e
    return out


def text_from_writer(name: str, text: str) -> str:
    """Process 0's `text` on every process (the others' `text` is ignored): a collective of every
    process, like `_exchange`."""
    return _exchange(name, text)[0]


def host_id() -> str:
    """This machine: its host name and boot id (containers on one machine may share a name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def processes_on_this_host() -> int:
    """How many processes of the run share this machine's memory (1 in a single-process run).

    Computed once, at the first call, which every process must make at the same point (the
    drivers do it before any layer)."""
    if "host_processes" not in _STATE:
        ids = _exchange("host", host_id())
        _STATE["host_processes"] = max(1, ids.count(ids[process_index()]))
    return int(_STATE["host_processes"])


def min_over_processes(name: str, value: int) -> int:
    """The smallest of every process's `value` (a collective of every process: see `_exchange`)."""
    return min(int(v) for v in _exchange(name, str(int(value))))


def _mesh_size(shape: Any, n_devices: int) -> int:
    if shape in ((), None, 0, "auto"):
        return n_devices
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if len(dims) != 1 or not all(isinstance(x, int) and x > 0 for x in dims):
        raise DistributedError(
            f"config.mesh_shape={shape!r} is invalid; allowed: () for all devices, or (n,) / n "
            "experts-axis devices"
        )
    n = dims[0]
    if n > n_devices or (process_count() > 1 and n != n_devices):
        raise DistributedError(
            f"config.mesh_shape={shape!r} does not fit the {n_devices} devices of this run"
            + (
                " (multi-process runs use every device: set it to () or the total)"
                if process_count() > 1
                else ""
            )
        )
    return n


def make_mesh(mesh_shape: Any = ()) -> jax.sharding.Mesh:
    """A one-axis mesh ("expert") over all devices, or over the first `mesh_shape` devices (``()``,
    ``n`` or ``(n,)``; `config.mesh_shape` on the command line).

    The axis is of the Auto type (as `jax.sharding.Mesh` was before explicit sharding): the code
    places its arrays with NamedSharding and shard_map, and `jax.make_mesh` would default to
    Explicit axes.
    """
    devices = jax.devices()
    n = _mesh_size(mesh_shape, len(devices))
    axis_type = getattr(jax.sharding, "AxisType", None)
    kw = {"axis_types": (axis_type.Auto,)} if axis_type is not None else {}
    if n == len(devices):
        try:
            return jax.make_mesh((n,), (EXPERT_AXIS,), **kw)
        except TypeError:  # a JAX whose make_mesh takes no axis_types: its axes are Auto already
            return jax.make_mesh((n,), (EXPERT_AXIS,))
    return jax.sharding.Mesh(np.asarray(devices[:n]), (EXPERT_AXIS,), **kw)


def broadcast_from_writer(tree: Any) -> Any:
    """Process 0's value of a pytree of numpy arrays on every process (returned as is for one
    process).

    Used for the allocation: a MILP with a time limit may stop at a different incumbent on each
    host, and every process must pack exactly the bits process 0 writes.
    """
    if process_count() <= 1:
        return tree
    from jax.experimental import multihost_utils

    got = multihost_utils.broadcast_one_to_all(tree)
    return jax.tree.map(lambda ref, a: np.asarray(a).astype(np.asarray(ref).dtype), tree, got)


def broadcast_from(source: int, value: np.ndarray | None, shape: tuple, dtype: Any) -> np.ndarray:
    """Process `source`'s array (of `shape` and `dtype`, known to every process) on every
    process; the others pass None.

    Bit-exact for every dtype: JAX's broadcast sums the source's array with zeros from every other
    process, and a float x + 0 is x except for −0 (which becomes +0), so the array travels as its
    bytes (uint8, the same size) and is viewed back. Callers: the quantized layer's forward (rows
    of activations) and the shared bases' vectors (`streamed_bases`). Every process calls it with
    the same `source`, shape and dtype (a collective)."""
    if process_count() <= 1:
        if value is None:
            raise ValueError("broadcast_from: one process, no value")
        return np.asarray(value)
    from jax.experimental import multihost_utils

    dtype = np.dtype(dtype)
    mine = process_index() == source
    arr = np.ascontiguousarray(value, dtype) if mine else np.zeros(shape, dtype)
    if arr.shape != tuple(shape):
        raise ValueError(f"broadcast_from: got shape {arr.shape}, every process expects {shape}")
    raw = arr.reshape(-1).view(np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(raw, is_source=mine))
    return got.view(dtype).reshape(shape)
