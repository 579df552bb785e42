"""Nested dicts of numpy arrays as one raw file plus a JSON index, written durably, read lazily.

The resumable work directory (`workdir.py`) keeps every finished layer's state in this format rather
than in orbax items because it needs three things orbax does not give it:

* durability on commit: the bytes are `fsync`ed before the directory holding them is renamed into
  place, so a `kill -9` (or a power loss) never leaves a committed layer with half-written data;
* lazy reads: `load(..., mmap=True)` returns memory-mapped views, so a model-scope allocation can
  open every layer's problem and touch only the small loss tables, not the units;
* bit-exact round trips of every dtype we use (bfloat16 included) with no per-item metadata files.

The quantized checkpoint stores its groups of experts' packed factors in this format too
(`serve.quantized_checkpoint`): every process of a run writes its own groups, and orbax writes numpy
arrays from process 0 only.

Layout of `<name>`: `<name>.bin` (the arrays' bytes, back to back, 64-byte aligned) and
`<name>.json` ({"arrays": {"a/b/c": {"dtype", "shape", "offset"}}, "extra": <any JSON>}).
Keys are joined with "/" and must not contain it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_ALIGN = 64


def _dtype(name: str) -> np.dtype:
    """np.dtype by name, the ml_dtypes extensions (bfloat16, ...) included."""
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(getattr(ml_dtypes, name))


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """("a/b/c", leaf) for every leaf of a nested dict, keys in sorted order (deterministic
    files)."""
    for k in sorted(tree, key=str):
        key = str(k)
        if "/" in key:
            raise ValueError(f"array-tree key {key!r} contains '/'")
        v = tree[k]
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", np.asarray(v)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (the latter makes a rename or a new entry durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save(directory: Path, name: str, tree: dict[str, Any], extra: Any = None) -> None:
    """Write `tree` (nested dicts of arrays) and the JSON-able `extra` as `<name>.bin` /
    `<name>.json`."""
    index: dict[str, dict[str, Any]] = {}
    with open(directory / f"{name}.bin", "wb") as f:
        offset = 0
        for key, a in flatten(tree):
            a = np.ascontiguousarray(a)
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            index[key] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset}
            f.write(a.tobytes())
            offset += a.nbytes
        f.flush()
        os.fsync(f.fileno())
    write_text_durable(
        directory / f"{name}.json", json.dumps({"arrays": index, "extra": extra}, indent=1)
    )


def load(directory: Path, name: str, mmap: bool = False) -> tuple[dict[str, Any], Any]:
    """(tree, extra) written by `save`; with `mmap` the arrays are read-only views of the file."""
    meta_path = directory / f"{name}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable array-file index ({e})") from e
    bin_path = directory / f"{name}.bin"
    size = bin_path.stat().st_size
    buf = (
        np.memmap(bin_path, mode="r")
        if (mmap and size)
        else (np.fromfile(bin_path, np.uint8) if size else np.zeros(0, np.uint8))
    )
    flat = {}
    for key, spec in meta["arrays"].items():
        dt = _dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        start = int(spec["offset"])
        if start + n > size:
            raise ValueError(
                f"{bin_path}: truncated (array {key!r} needs bytes up to {start + n}, file has "
                f"{size})"
            )
        flat[key] = buf[start : start + n].view(dt).reshape(shape)
    return unflatten(flat), meta["extra"]
