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
from collections.abc import Callable, Iterator
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
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
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


# Block-scaled FP8 (DeepSeek-V3, Kimi-K2, GLM-4.5-FP8 on the hub): `X.weight` float8 [.., R, C]
# beside `X.weight_scale_inv` float32 [.., ceil(R/b0), ceil(C/b1)]; the weight is fp8 × scale per
# b0×b1 block (b = config.json's quantization_config.weight_block_size, 128×128 in every release).
FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def fp8_block_size(checkpoint_dir: Path) -> tuple[int, int]:
    """The FP8 weight block size named by config.json (128×128 when it does not say)."""
    try:
        qc = json.loads((checkpoint_dir / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return DEFAULT_BLOCK
    block = (qc or {}).get("weight_block_size") if isinstance(qc, dict) else None
    if not block:
        return DEFAULT_BLOCK
    if len(block) != 2 or any(int(b) < 1 for b in block):
        raise CheckpointError(
            f"{checkpoint_dir / 'config.json'}: quantization_config.weight_block_size {block!r} "
            "is not two positive sizes"
        )
    return int(block[0]), int(block[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The block-scale shape of a weight of `shape` (leading axes kept, the last two in blocks)."""
    *lead, r, c = shape
    return (*lead, -(-r // block[0]), -(-c // block[1]))


def dequantize_blocks(
    w: np.ndarray, scale: np.ndarray, block: tuple[int, int], row_offset: int = 0
) -> np.ndarray:
    """float32 fp8 weights × their block scales. `w` [.., R, C] may be a row slice of a 2-D
    weight starting `row_offset` rows into the first block row of `scale`."""
    s = np.repeat(np.repeat(scale.astype(np.float32), block[0], axis=-2), block[1], axis=-1)
    r, c = w.shape[-2:]
    return w.astype(np.float32) * s[..., row_offset : row_offset + r, :c]


# MXFP4 (GPT-OSS experts): `X_blocks` uint8 [E, R, G, 16] — two e2m1 codes per byte, low nibble
# first — and `X_scales` uint8 [E, R, G], one power of two (e8m0, bias 127) per 32 values along
# the input axis. `X` is then [E, G·32, R] (transformers' in-memory layout: input rows, output
# columns) with value e2m1 · 2^(scale − 127).
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [.., G·32, R] values of MXFP4 `blocks` [.., R, G, 16] with `scales` [.., R, G]
    (exact: every e2m1 value times a power of two is a float32). Scale 255 is e8m0's NaN."""
    out = np.empty((*blocks.shape[:-1], 32), np.float32)
    out[..., 0::2] = E2M1_VALUES[blocks & 0x0F]
    out[..., 1::2] = E2M1_VALUES[blocks >> 4]
    exp = scales.astype(np.int32) - 127
    mult = np.where(scales == 255, np.float32(np.nan), np.ldexp(np.float32(1), exp))
    out *= mult[..., None].astype(np.float32)
    out = out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)
    return np.ascontiguousarray(np.swapaxes(out, -1, -2))


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

    def rename(self, fn: Callable[[str], str | None]) -> None:
        """List tensors under `fn(name)`, dropping those it maps to None (`text_model_name`)."""
        self.entries = {n: e for k, e in self.entries.items() if (n := fn(k)) is not None}

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
        self._stored: dict[str, str] | None = None  # our name -> the pickle's (after `rename`)

    def rename(self, fn: Callable[[str], str | None]) -> None:
        self._stored = {n: k for k in self._load().keys() if (n := fn(k)) is not None}

    def _key(self, name: str) -> str:
        return name if self._stored is None else self._stored[name]

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
        return list(self._load().keys()) if self._stored is None else list(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load()[self._key(name)].shape)

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._load()[self._key(name)]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.get(name)[start:stop]  # a .bin shard is one pickle: no partial reads

    def close(self) -> None:
        self._sd = None


# Image-text checkpoints (the hub's Llama 4) hold the language model under `language_model.` and a
# vision tower and projector beside it; conversion reads the language model only.
TEXT_MODEL_PREFIX = "language_model."
NON_TEXT_PREFIXES = ("vision_model.", "multi_modal_projector.")


def text_model_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor name as the text-only model's (None: not the text model's;
    unknown names are kept so that conversion reports them as unused)."""
    if name.startswith(TEXT_MODEL_PREFIX):
        return name[len(TEXT_MODEL_PREFIX) :]
    if name.startswith(NON_TEXT_PREFIXES):
        return None
    return name


class HFCheckpoint:
    """All tensors of a checkpoint directory, by name, read one at a time on demand.

    Multimodal checkpoints are read as their language model (`text_model_name`); the vision
    tensors are listed in `skipped`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        self._where: dict[str, Path] = {}
        self._files: dict[Path, SafetensorsFile | _BinFile] = {}
        self._rename: Callable[[str], str | None] | None = None
        self.skipped: list[str] = []
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
        if any(k.startswith(TEXT_MODEL_PREFIX) for k in self._where):
            self._read_as_text_model()
        self._find_block_scales()
        self._find_mxfp4()

    def _find_mxfp4(self) -> None:
        """Pair `X_blocks` with `X_scales` into one virtual tensor `X` (see `decode_mxfp4`)."""
        self._mxfp4: dict[str, tuple[str, str]] = {}
        for k in [k for k in self._where if k.endswith(MXFP4_BLOCKS)]:
            base = k[: -len(MXFP4_BLOCKS)]
            sk = base + MXFP4_SCALES
            f = self._where[k]
            if sk not in self._where:
                raise CheckpointError(f"{f}: MXFP4 tensor {k!r} has no scales {sk!r}")
            bshape, sshape = self._open(f).shape(k), self._open(self._where[sk]).shape(sk)
            if len(bshape) < 3 or bshape[-1] != 16 or tuple(sshape) != tuple(bshape[:-1]):
                raise CheckpointError(
                    f"{f}: MXFP4 tensor {k!r} of shape {tuple(bshape)} with scales {sk!r} of shape "
                    f"{tuple(sshape)}: expected [..., rows, groups, 16] blocks and [..., rows, "
                    "groups] scales"
                )
            self._mxfp4[base] = (k, sk)
            self._scale_where[k] = self._where.pop(k)
            self._scale_where[sk] = self._where.pop(sk)
            self._where[base] = f

    def _find_block_scales(self) -> None:
        """Pair every FP8 tensor with its block scale and check the scale's shape, before any
        work: the scales are then read with their weights and never listed as tensors."""
        self.block = fp8_block_size(self.path)
        self._scales: dict[str, str] = {}
        self._scale_where: dict[str, Path] = {}
        for k in [k for k in self._where if k.endswith(SCALE_SUFFIX)]:
            base = k[: -len(SCALE_SUFFIX)]
            if base not in self._where:
                raise CheckpointError(
                    f"{self._where[k]}: block scale {k!r} has no tensor {base!r} to scale"
                )
            self._scales[base] = k
            self._scale_where[k] = self._where.pop(k)
        for name, f in self._where.items():
            if f.suffix != ".safetensors":
                continue
            dt, shape = self._open(f).entries[name][:2]
            if dt not in FP8_DTYPES:
                continue
            sk = self._scales.get(name)
            if sk is None:
                raise CheckpointError(
                    f"{f}: tensor {name!r} is stored in {dt} without its block scale "
                    f"{name + SCALE_SUFFIX!r}"
                )
            want = scale_shape(shape, self.block) if len(shape) >= 2 else None
            got = self._open(self._scale_where[sk]).shape(sk)
            if want is None or tuple(got) != want:
                raise CheckpointError(
                    f"{self._scale_where[sk]}: block scale {sk!r} has shape {tuple(got)}, expected "
                    f"{want} for {name!r} of shape {shape} in {self.block[0]}x{self.block[1]} "
                    "blocks (config.json quantization_config.weight_block_size)"
                )

    def _read_as_text_model(self) -> None:
        where: dict[str, Path] = {}
        for k, f in self._where.items():
            n = text_model_name(k)
            if n is None:
                self.skipped.append(k)
            else:
                where[n] = f
        self._where = where
        self._rename = text_model_name
        for sf in self._files.values():
            sf.rename(text_model_name)

    def _open(self, f: Path) -> SafetensorsFile | _BinFile:
        if f not in self._files:
            sf = SafetensorsFile(f) if f.suffix == ".safetensors" else _BinFile(f)
            if self._rename is not None:
                sf.rename(self._rename)
            self._files[f] = sf
        return self._files[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            b = self._open(self._where[name]).shape(self._mxfp4[name][0])
            return (*b[:-3], b[-2] * 32, b[-3])
        return self._open(self._where[name]).shape(name)

    def get(self, name: str, check_finite: bool = True) -> np.ndarray:
        """The tensor `name` as stored (bf16/fp16/fp32), block-scaled FP8 as float32 values;
        NaN/Inf is an error naming tensor and file."""
        return self._read(name, None, check_finite)

    def get_rows(self, name: str, start: int, stop: int, check_finite: bool = True) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis, reading only their bytes (safetensors)."""
        return self._read(name, (start, stop), check_finite)

    def _read(self, name: str, rows: tuple[int, int] | None, check_finite: bool) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        f = self._where[name]
        if rows is not None:
            shape = self.shape(name)
            if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
                raise CheckpointError(
                    f"{f}: tensor {name!r} of shape {shape} has no rows [{rows[0]}, {rows[1]})"
                )
        if name in self._mxfp4:
            a = self._read_mxfp4(name, rows)
        elif rows is None:
            a = self._open(f).get(name)
        else:
            a = self._open(f).get_rows(name, *rows)
        if name in self._scales:
            a = self._dequantize(name, a, rows)
        if check_finite and not all_finite(a):
            raise CheckpointError(f"{f}: tensor {name!r} contains NaN or Inf values")
        return a

    def _read_mxfp4(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
        """Decoded MXFP4 values; `rows` index the leading (expert) axis."""
        bk, sk = self._mxfp4[name]
        fb, fs = self._open(self._scale_where[bk]), self._open(self._scale_where[sk])
        if rows is None:
            return decode_mxfp4(fb.get(bk), fs.get(sk))
        return decode_mxfp4(fb.get_rows(bk, *rows), fs.get_rows(sk, *rows))

    def _dequantize(self, name: str, w: np.ndarray, rows: tuple[int, int] | None) -> np.ndarray:
        """float32 values of an FP8 tensor (or rows of it), reading only the scales they use."""
        sk = self._scales[name]
        sf = self._open(self._scale_where[sk])
        b0 = self.block[0]
        if rows is None:
            return dequantize_blocks(w, sf.get(sk), self.block)
        if w.ndim >= 3:  # rows of a fused [E, R, C] tensor are whole experts
            return dequantize_blocks(w, sf.get_rows(sk, *rows), self.block)
        first = rows[0] // b0
        scale = sf.get_rows(sk, first, -(-rows[1] // b0))
        return dequantize_blocks(w, scale, self.block, rows[0] - first * b0)

    def release(self) -> None:
        """Drop memory maps / loaded .bin shards (called between layers to bound memory)."""
        for f in self._files.values():
            f.close()

    def iter_prefix(self, prefix: str) -> Iterator[str]:
        return (k for k in self._where if k.startswith(prefix))
