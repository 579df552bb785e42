"""Where one MoE layer's expert weights come from, a few experts at a time, and how many at a time.

The quantizer never holds a layer's experts whole: every stage (the Gram matrices of the shared
bases, the statistics, factors and coefficients, the unquantized forward) asks its `ExpertSource`
for a chunk of experts, works on them in float32, and drops them. A checkpoint on disk is read by
byte ranges (`run.expert_reader.CheckpointSource`: one expert's tensors, or its rows of a fused
tensor), so a process's peak memory is set by the chunk, not by the layer — nor by the number of
experts.

The chunk size comes from `plan_chunk`: the float32 working set of one expert (its three matrices,
their factors and loss weights, the float64 statistics of the gate/up factors, the rounding's
copies) against the host memory the run may use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

PROJECTION_NAMES = ("gate", "up", "down")
IN_FLIGHT_FRACTION = 0.1  # of the host memory, for the experts in flight (`plan_chunk`)


class ExpertSource(Protocol):
    """A layer's routed experts in our layout (gate/up [D, F], down [F, D]), read on demand."""

    num_experts: int

    def read(
        self, experts: Sequence[int], which: Sequence[str] = PROJECTION_NAMES
    ) -> dict[str, np.ndarray]:
        """float32 {projection: [len(experts), ...]} of the listed experts (in that order)."""
        ...


@dataclasses.dataclass
class ArraySource:
    """Experts already in memory (any float dtype; numpy or JAX): the tests, and converted
    (orbax) checkpoints, which are read a layer at a time."""

    gate: Any
    up: Any
    down: Any

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])

    def read(
        self, experts: Sequence[int], which: Sequence[str] = PROJECTION_NAMES
    ) -> dict[str, np.ndarray]:
        ids = np.asarray(list(experts), np.int64)
        return {p: np.asarray(np.asarray(getattr(self, p))[ids], np.float32) for p in which}


def expert_working_bytes(hidden: int, inter: int, routed_rows: int) -> int:
    """Host bytes one expert in flight costs at its peak (float32 unless said otherwise).

    Its three matrices as read (1×) and their factors (1×), the loss weights (1×), the float64
    gate/up statistics before they fold into the weights (≈1.3×, F×D each), the error feedback's
    compensated copy (1×) and the JAX device copies of the per-expert programs (≈1×), plus its
    `routed_rows` calibration rows and their hidden activations.
    """
    one = 3 * hidden * inter * 4
    return int(6.5 * one + 4 * routed_rows * (hidden + 3 * inter))


def layer_basis_bytes(hidden: int, rank: int) -> int:
    """Host bytes of a layer's three [D, r] bases while its experts are worked on: int8 codes (1),
    the dequantized float32 basis (4) and the float32 inverse the factors are fitted with (4) —
    at hidden 7168 and full rank 1.3 GiB, more than a DeepSeek-V3 expert in flight."""
    return 3 * hidden * max(int(rank), 0) * 9


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (or the physical memory where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def host_memory_bytes(host_memory_gb: float | None) -> int:
    """The host memory a run plans with: `host_memory_gb` if set, else 90 % of what is available
    now."""
    if host_memory_gb:
        return int(float(host_memory_gb) * (1 << 30))
    return int(0.9 * available_memory_bytes())


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How many experts each device works on at a time, and what that is expected to cost."""

    chunk: int
    per_expert_bytes: int
    fixed_bytes: int
    budget_bytes: int
    automatic: bool
    devices: int = 1
    host_processes: int = 1  # processes of the run sharing this machine's memory

    @property
    def expected_peak_bytes(self) -> int:
        return self.fixed_bytes + self.chunk * self.devices * self.per_expert_bytes

    def describe(self, num_experts: int) -> str:
        gib = 1 << 30
        how = "from host_memory_gb" if self.automatic else "set by expert_chunk"
        return (
            f"memory plan: {self.chunk} of {num_experts} experts at a time per device "
            f"({self.devices} device(s) in this process; {how}), "
            f"~{self.per_expert_bytes / gib:.2f} GiB per expert in flight, expected peak "
            f"~{self.expected_peak_bytes / gib:.1f} GiB (host memory {self.budget_bytes / gib:.1f} "
            "GiB"
            + (
                f" per process: this machine's share for each of its {self.host_processes} "
                "processes)"
                if self.host_processes > 1
                else ")"
            )
        )


def plan_chunk(
    hidden: int,
    inter: int,
    num_experts: int,
    calib_rows: int,
    host_memory_gb: float | None,
    expert_chunk: int | None,
    local_devices: int = 1,
    host_processes: int = 1,
    basis_rank: int = 0,
) -> ChunkPlan:
    """Experts per device per round: `expert_chunk` if set, else as many as fit in
    `IN_FLIGHT_FRACTION` of this process's share of `host_memory_gb` (default: the memory available
    now), at least one. The host's memory is shared by the `host_processes` processes of the run on
    this machine, so each plans with 1 / host_processes of it: two processes on one machine each
    hold half the experts in flight that one process would.

    A small fraction on purpose: the per-expert programs run one expert after another whatever the
    chunk, so larger chunks save only dispatch and read calls, while the peak grows with them; a
    chunk that does not depend on the number of experts keeps a 256-expert layer's peak at a
    16-expert layer's.

    `basis_rank`: the rank of the layer's three shared bases (0: no bases, a baseline), whose
    stored, dequantized and inverted copies are alive through the layer whatever the chunk.
    """
    per = expert_working_bytes(hidden, inter, 2 * calib_rows // max(num_experts, 1))
    fixed = (1 << 30) + 6 * calib_rows * hidden * 4 + layer_basis_bytes(hidden, basis_rank)
    host = host_memory_bytes(host_memory_gb)
    shared = max(1, int(host_processes))
    budget = host // shared
    if expert_chunk:
        return ChunkPlan(int(expert_chunk), per, fixed, budget, False, local_devices, shared)
    fit = int(IN_FLIGHT_FRACTION * budget) // max(per * max(local_devices, 1), 1)
    chunk = int(max(1, min(num_experts, fit)))
    return ChunkPlan(chunk, per, fixed, budget, True, local_devices, shared)
