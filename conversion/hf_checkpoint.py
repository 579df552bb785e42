"""Streamed reading of Hugging Face checkpoint directories.

A checkpoint is `config.json` plus either safetensors files (one, or many behind
`model.safetensors.index.json`) or PyTorch `.bin` files (behind `pytorch_model.bin.index.json`).
Safetensors are parsed here directly (header + memory map): a tensor's bytes are read only when it
is asked for, so a layer at a time can be converted from a checkpoint far larger than RAM, and a
truncated file is detected from its header before anything is read. `.bin` files need torch
(optional extra) and are opened with `weights_only=True, mmap=True`.

Every error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """The checkpoint on disk is incomplete, corrupt, or not what its config says."""


_ST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# NaN and Inf are the floats whose exponent bits are all ones: (bit view, exponent mask).
_EXPONENT_MASKS = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


def all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in `a` (True for integer arrays): the largest masked exponent of the bit view,
    which is four times faster than `isfinite` on a float32 copy of bf16 weights and allocates
    only the masked view's chunk."""
    view = _EXPONENT_MASKS.get(a.dtype)
    if view is None or a.size == 0:
        return True
    bits, mask = view
    return int(np.bitwise_and(a.view(bits), mask).max()) < mask


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data memory-mapped and read per tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(
                        f"{path}: corrupt or truncated safetensors header (length {n}, file {size} "
                        "bytes)"
                    )
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        data_start = 8 + n
        end_max = 0
        for name, e in header.items():
            if not isinstance(e, dict):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header entry for tensor {name!r}"
                )
            dt = _ST_DTYPES.get(e.get("dtype"))
            if dt is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}"
                )
            try:
                begin, end = (int(o) for o in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header entry for tensor {name!r} ({err!r})"
                ) from err
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise CheckpointError(
                    f"{path}: tensor {name!r} byte range does not match its shape {shape}"
                )
            self.entries[name] = (dt, shape, data_start + begin, data_start + end)
            end_max = max(end_max, data_start + end)
        if end_max > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: header needs {end_max} bytes, file has {size}"
            )
        self._mm: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        return self.get_rows(name, 0, self.entries[name][1][0] if self.entries[name][1] else None)

    def get_rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis (the whole tensor for stop=None on a
        scalar),
        read from those rows' bytes only: C order makes them one contiguous range."""
        dt, shape, begin, end = self.entries[name]
        if stop is None:  # a 0-d tensor
            rows, row_bytes, shape_out = 1, end - begin, shape
        else:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize
            rows, shape_out = stop - start, (stop - start, *shape[1:])
            begin += start * row_bytes
        nbytes = rows * row_bytes
        if nbytes == 0:
            return np.zeros(shape_out, dt)
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return (
            np.frombuffer(self._mm, dtype=dt, count=nbytes // dt.itemsize, offset=begin)
            .reshape(shape_out)
            .copy()
        )

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def write_safetensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file (what HF loads), bf16 included, without needing torch."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors")
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for a in arrays:
            f.write(a.tobytes())


class _BinFile:
    """A PyTorch .bin shard, loaded lazily with torch (weights_only, mmap)."""

    def __init__(self, path: Path):
        self.path = path
        self._sd = None

    def _load(self):
        if self._sd is None:
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise CheckpointError(
                    f"{self.path}: PyTorch .bin checkpoints need torch; install the extra: pip "
                    "install 'bitsmoe-jax[torch]'"
                ) from e
            try:
                self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"{self.path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})"
                ) from e
        return self._sd

    def keys(self) -> list[str]:
        return list(self._load().keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load()[name].shape)

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._load()[name]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.get(name)[start:stop]  # a .bin shard is one pickle: no partial reads

    def close(self) -> None:
        self._sd = None


class HFCheckpoint:
    """All tensors of a checkpoint directory, by name, read one at a time on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self._where: dict[str, Path] = {}
        self._files: dict[Path, SafetensorsFile | _BinFile] = {}
        st_index = self.path / "model.safetensors.index.json"
        bin_index = self.path / "pytorch_model.bin.index.json"
        if st_index.is_file() or bin_index.is_file():
            index = st_index if st_index.is_file() else bin_index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e})") from e
            for name, fname in weight_map.items():
                self._where[name] = self.path / fname
            for f in sorted(set(self._where.values())):
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        else:
            shards = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
            if not shards:
                raise CheckpointError(f"{self.path}: no *.safetensors or *.bin weight files found")
            for f in shards:
                for name in self._open(f).keys():
                    self._where[name] = f
        # Parse every safetensors header up front: truncation is reported before any work starts.
        for f in sorted(set(self._where.values())):
            if f.suffix == ".safetensors":
                st = self._open(f)
                missing = [n for n, p in self._where.items() if p == f and n not in st.entries]
                if missing:
                    raise CheckpointError(
                        f"{f}: tensor {missing[0]!r} listed in the index is not in this shard"
                    )

    def _open(self, f: Path) -> SafetensorsFile | _BinFile:
        if f not in self._files:
            self._files[f] = SafetensorsFile(f) if f.suffix == ".safetensors" else _BinFile(f)
        return self._files[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._open(self._where[name]).shape(name)

    def get(self, name: str, check_finite: bool = True) -> np.ndarray:
        """The tensor `name` as stored (bf16/fp16/fp32); NaN/Inf is an error naming tensor and
        file."""
        return self._read(name, None, check_finite)

    def get_rows(self, name: str, start: int, stop: int, check_finite: bool = True) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis, reading only their bytes (safetensors)."""
        return self._read(name, (start, stop), check_finite)

    def _read(self, name: str, rows: tuple[int, int] | None, check_finite: bool) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        f = self._where[name]
        if rows is None:
            a = self._open(f).get(name)
        else:
            shape = self._open(f).shape(name)
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise CheckpointError(
                    f"{f}: tensor {name!r} of shape {shape} has no rows [{rows[0]}, {rows[1]})"
                )
            a = self._open(f).get_rows(name, *rows)
        if check_finite and not all_finite(a):
            raise CheckpointError(f"{f}: tensor {name!r} contains NaN or Inf values")
        return a

    def release(self) -> None:
        """Drop memory maps / loaded .bin shards (called between layers to bound memory)."""
        for f in self._files.values():
            f.close()

    def iter_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self._where if k.startswith(prefix))
