"""Pre-flight check of a checkpoint: every tensor present, of the shape config.json implies, finite.

A quantization run reads the checkpoint a layer at a time, so without this a NaN or a missing
tensor in the last layer is found after hours of work on the layers before it. `preflight` runs
before any work and before anything is written:

1. headers (free: safetensors headers are parsed, no values read): every parameter the model
   needs is present in the layout the checkpoint uses (per-expert or fused experts), with the
   shape config.json implies, and no tensor is left that the model would silently drop;
2. values (`check_values`, one read of the weight files, a bounded slice at a time): no NaN or Inf.

Every error is a `CheckpointError` naming the file and the tensor (and the layer).
Converted (orbax) checkpoints are checked a part at a time, their parameter paths named.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from bitsmoe_jax.io.checkpoint import intify_layer_keys, load_tree
from bitsmoe_jax.models.config import ModelConfig
from conversion.convert import check_all_used, expected_parts, iter_leaves
from conversion.hf_checkpoint import CheckpointError, HFCheckpoint
from conversion.key_maps import TOP_LEVEL, expert_bias_key, expert_tensor_shapes, param_candidates

SLICE_BYTES = 64 << 20  # values are read this much at a time: the check's own memory


@dataclass(frozen=True)
class PreflightSummary:
    """What was checked: for the run's log line."""

    tensors: int
    bytes_checked: int  # 0 when values were not read
    seconds: float

    def describe(self) -> str:
        what = (
            f"{self.tensors} tensors, shapes and values ({self.bytes_checked / 2**30:.2f} GiB)"
            if self.bytes_checked
            else f"{self.tensors} tensors, shapes only"
        )
        return f"pre-flight check: {what} fine in {self.seconds:.1f} s"


def expected_hf_shapes(ckpt: HFCheckpoint, config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    """{HF key: (what it is, its expected shape)} for every tensor the model reads from `ckpt`,
    resolved in the checkpoint's own layout; a missing tensor is an error naming it."""
    keys = dict.fromkeys(ckpt.keys())
    expected, layers = expected_parts(config)
    out: dict[str, tuple[str, tuple]] = {}
    for path, spec in iter_leaves(expected):
        hf_key, transpose = TOP_LEVEL[path]
        if hf_key not in keys:
            raise CheckpointError(f"{ckpt.path}: tensor {hf_key!r} is missing from the checkpoint")
        out[hf_key] = (".".join(path), tuple(spec.shape)[::-1] if transpose else spec.shape)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for path, spec in iter_leaves(layers[i]):
            what = f"{'.'.join(map(str, path))} of layer {i}"
            if path[:2] == ("mlp", "experts"):
                for k, shape in expert_tensor_shapes(
                    prefix, path[2], keys, config.num_experts, spec.shape[1:]
                ):
                    if k not in keys:
                        raise CheckpointError(
                            f"{ckpt.path}: tensor {k!r} is missing from the checkpoint"
                        )
                    out[k] = (what, shape)
                continue
            if path[:2] == ("mlp", "expert_bias"):  # GPT-OSS: gate/up interleaved in one
                k, _ = expert_bias_key(prefix, path[2])
                e, n = spec.shape
                out[k] = (what, (e, n if path[2] == "down" else 2 * n))
                if k not in keys:
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {k!r} is missing from the checkpoint"
                    )
                continue
            candidates, transpose = param_candidates(path, prefix)
            found = next((k for k in candidates if k in keys), None)
            if found is None:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {candidates[0]!r} is missing from the checkpoint"
                )
            out[found] = (what, tuple(spec.shape)[::-1] if transpose else tuple(spec.shape))
    return out


def _check_headers(ckpt: HFCheckpoint, config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    wanted = expected_hf_shapes(ckpt, config)
    for k, (what, shape) in wanted.items():
        got = tuple(ckpt.shape(k))
        if got != tuple(shape):
            raise CheckpointError(
                f"{ckpt.file_of(k)}: tensor {k!r} has shape {got}, expected {tuple(shape)} from "
                f"config.json ({what})"
            )
    check_all_used(ckpt, set(wanted), config)
    return wanted


def _row_slices(shape: tuple[int, ...], itemsize: int) -> list[tuple[int, int] | None]:
    """Row ranges of at most ~SLICE_BYTES each (None: the tensor is 0-d, read whole)."""
    if not shape:
        return [None]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    step = max(1, SLICE_BYTES // row_bytes)
    return [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)] or [(0, 0)]


def _check_hf(
    path: Path, config: ModelConfig, check_values: bool, on_bytes: Callable[[int], None]
) -> tuple[int, int]:
    ckpt = HFCheckpoint(path)  # parses every header: truncated files are reported here
    try:
        wanted = _check_headers(ckpt, config)
        if not check_values:
            return len(wanted), 0
        checked = 0
        # file order, then offset order: one sequential pass over each file
        for k in sorted(wanted, key=lambda k: (str(ckpt.file_of(k)), k)):
            shape = tuple(ckpt.shape(k))
            for rows in _row_slices(shape, 4):
                a = ckpt.get(k) if rows is None else ckpt.get_rows(k, *rows)  # raises on NaN/Inf
                checked += a.nbytes
                on_bytes(a.nbytes)
                del a
            ckpt.release()
        return len(wanted), checked
    finally:
        ckpt.release()


def _check_converted(
    path: Path, config: ModelConfig, check_values: bool, on_bytes: Callable[[int], None]
) -> tuple[int, int]:
    expected, layers = expected_parts(config)
    parts = [("top", expected)] + [(f"layer_{i:03d}", layers[i]) for i in range(len(layers))]
    tensors = checked = 0
    for name, spec_tree in parts:
        item = path / "params" / name
        tree = intify_layer_keys(load_tree(item))
        for leaf_path, spec in iter_leaves(spec_tree):
            node = tree
            for k in leaf_path:
                node = node.get(k) if isinstance(node, dict) else None
                if node is None:
                    break
            where = f"{item}: parameter {'.'.join(map(str, leaf_path))}"
            if node is None:
                raise CheckpointError(f"{where} is missing from the checkpoint")
            a = np.asarray(node)
            if tuple(a.shape) != tuple(spec.shape):
                raise CheckpointError(
                    f"{where} has shape {tuple(a.shape)}, expected {tuple(spec.shape)} from the "
                    "config"
                )
            tensors += 1
            if check_values and (a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16):
                if not np.isfinite(a.astype(np.float32)).all():
                    raise CheckpointError(f"{where} contains NaN or Inf values")
                checked += a.nbytes
                on_bytes(a.nbytes)
        del tree
    return tensors, checked


def preflight(
    path: str | Path,
    config: ModelConfig,
    check_values: bool = True,
    progress: bool = False,
    kind: str = "hf",
) -> PreflightSummary:
    """Check the checkpoint at `path` (`kind` "hf" or "converted", as `loading.checkpoint_kind`
    says) against `config` before any work: raises `CheckpointError` naming file and tensor;
    returns what was checked."""
    p = Path(path)
    t0 = time.time()
    bar = None
    if progress and check_values and sys.stderr.isatty():  # log files get the summary line
        from tqdm.auto import tqdm

        bar = tqdm(desc="pre-flight check", unit="B", unit_scale=True, leave=False)

    def on_bytes(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        if kind == "hf":
            tensors, checked = _check_hf(p, config, check_values, on_bytes)
        elif kind == "converted":
            tensors, checked = _check_converted(p, config, check_values, on_bytes)
        else:
            raise ValueError(
                f"{p}: expected a Hugging Face or converted checkpoint to quantize, found {kind!r}"
            )
    finally:
        if bar is not None:
            bar.close()
    return PreflightSummary(tensors, checked, time.time() - t0)
