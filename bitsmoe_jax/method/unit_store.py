"""A layer's units and loss weights, kept per expert: in memory, or on disk out of the way.

The units (the experts' spectral factors, `[E, r, F]` per projection) and their loss weights are
as large as the layer in float32 each. They are made chunk by chunk before the allocation and read
back chunk by chunk by the rounding after it, so a streamed run spills them to a `DiskUnits` store
(plain files, written and read with positioned I/O — no memory map, so the pages read for one chunk
never count in the process's resident set) and holds only the chunk it works on. `MemoryUnits`
wraps whole arrays (tests, benchmarks, small layers).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

KINDS = ("units", "weights")


class UnitStore(Protocol):
    """Per-expert `[r, F]` units and loss weights of the three projections."""

    def rank(self, p: str) -> int: ...

    def load(self, p: str, experts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(units, weights), float32 `[len(experts), r, F]`, in the order of `experts`."""
        ...

    def remove(self) -> None:
        """Drop what the store holds on disk (a problem no longer needed)."""
        ...


class MemoryUnits:
    """Whole `[E, r, F]` arrays per projection."""

    def __init__(self, units: dict[str, np.ndarray], weights: dict[str, np.ndarray]):
        self.units, self.weights = units, weights

    def rank(self, p: str) -> int:
        return int(self.units[p].shape[1])

    def put(self, p: str, expert: int, units: np.ndarray, weights: np.ndarray) -> None:
        self.units[p][expert] = units
        self.weights[p][expert] = weights

    def remove(self) -> None:
        """Nothing on disk: the arrays go with the store."""

    def load(self, p: str, experts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(list(experts), np.int64)
        return (
            np.asarray(self.units[p][ids], np.float32),
            np.asarray(self.weights[p][ids], np.float32),
        )


class NoUnits:
    """The ranks of a problem whose units are not kept: enough to allocate it (its loss tables and
    costs live in the problem), not to pack it. The first pass of a whole-model budget
    (`run/model_scope.py`) keeps only this, so a layer's units never reach the disk there."""

    def __init__(self, ranks: dict[str, int]):
        self.ranks = {p: int(r) for p, r in ranks.items()}

    def rank(self, p: str) -> int:
        return self.ranks[p]

    def put(self, p: str, expert: int, units: np.ndarray, weights: np.ndarray) -> None:
        """Dropped: only the loss tables made from them are kept."""

    def load(self, p: str, experts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError(
            "this problem kept its loss tables only (the first pass of budget_scope='model'): "
            "its units were never stored, so it can be allocated but not packed"
        )

    def remove(self) -> None:
        """Nothing held."""


class DiskUnits:
    """One raw float32 file per projection and kind, `[E, r, F]` in C order, expert by expert.

    `index.json` records the shapes; experts are written as they are made (`put`) and the store
    is complete once every expert was written (`finish`). A committed store (a work directory
    layer's `units/`) is never written again.
    """

    INDEX = "index.json"

    def __init__(self, root: Path, shapes: dict[str, tuple[int, int, int]] | None = None):
        self.root = Path(root)
        if shapes is None:
            meta = json.loads((self.root / self.INDEX).read_text())
            shapes = {p: tuple(s) for p, s in meta["shapes"].items()}
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            for p, shape in shapes.items():
                for kind in KINDS:
                    with open(self._file(p, kind), "wb") as f:
                        f.truncate(int(np.prod(shape)) * 4)
            (self.root / self.INDEX).write_text(json.dumps({"shapes": shapes}))
        self.shapes = shapes

    def _file(self, p: str, kind: str) -> Path:
        return self.root / f"{kind}_{p}.f32"

    def _row_bytes(self, p: str) -> int:
        _, r, f = self.shapes[p]
        return r * f * 4

    def rank(self, p: str) -> int:
        return int(self.shapes[p][1])

    def put(self, p: str, expert: int, units: np.ndarray, weights: np.ndarray) -> None:
        for kind, arr in zip(KINDS, (units, weights), strict=True):
            data = np.ascontiguousarray(arr, np.float32)
            if data.shape != tuple(self.shapes[p][1:]):
                raise ValueError(f"{kind} of expert {expert}: shape {data.shape}")
            fd = os.open(self._file(p, kind), os.O_WRONLY)
            try:
                os.pwrite(fd, memoryview(data).cast("B"), expert * self._row_bytes(p))
            finally:
                os.close(fd)

    def load(self, p: str, experts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        _, r, f = self.shapes[p]
        out = []
        for kind in KINDS:
            arr = np.empty((len(experts), r, f), np.float32)
            fd = os.open(self._file(p, kind), os.O_RDONLY)
            try:
                for j, e in enumerate(experts):
                    buf = os.pread(fd, self._row_bytes(p), int(e) * self._row_bytes(p))
                    arr[j] = np.frombuffer(buf, np.float32).reshape(r, f)
            finally:
                os.close(fd)
            out.append(arr)
        return out[0], out[1]

    def files(self) -> list[Path]:
        return [self.root / self.INDEX] + [
            self._file(p, kind) for p in self.shapes for kind in KINDS
        ]

    def link_into(self, dest: Path) -> DiskUnits:
        """The same store under `dest` (hard links where the filesystem allows, else copies)."""
        dest.mkdir(parents=True, exist_ok=True)
        for f in self.files():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copyfile(f, dest / f.name)
            fd = os.open(dest / f.name, os.O_RDONLY)
            try:
                os.fsync(fd)  # durable before the directory holding it is committed
            finally:
                os.close(fd)
        return DiskUnits(dest)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
