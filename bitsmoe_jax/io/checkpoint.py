"""Checkpoint I/O: atomic output directories and orbax pytrees of numpy arrays.

Every output directory is first written under a hidden temporary sibling and renamed into place
only when complete, so an interrupted run never leaves something that looks like a finished
checkpoint. Parameter trees are saved per part (one orbax item for the top-level weights, one per
decoder layer) so that conversion and quantization can stream a layer at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

FORMAT_CONVERTED = "bitsmoe-jax/converted"
META_FILE = "bitsmoe_model.json"
EMPTY_ARRAYS_FILE = "empty_arrays.json"


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` only if the block finishes without
    error."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out}: output directory already exists (pass --overwrite to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _stringify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return np.asarray(tree)


def _checkpointer():
    import orbax.checkpoint as ocp

    mp = _this_process_only()
    return ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(multiprocessing_options=mp), multiprocessing_options=mp
    )


def _this_process_only():
    """Orbax options for I/O by this process alone: in a multi-process run only process 0 writes,
    and orbax's default (every process joins each save/restore) would wait for peers that never
    come.
    """
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"
    )


class _NoOcdbtMergeNotice(logging.Filter):
    """Drop orbax's per-save warning that there are no OCDBT files to merge: we write without OCDBT
    on
    purpose (`_writer`), and a quantization run saves a few items per layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoOcdbtMergeNotice())


def _writer():
    """Orbax without OCDBT for writing: one zarr directory per array, named by its key.

    OCDBT names its data files at random, so two runs writing the same arrays would differ byte for
    byte; per-array zarr files are a function of the arrays alone (what makes a resumed quantization
    run's output byte-identical to an uninterrupted one). Only orbax's own bookkeeping files
    `_CHECKPOINT_METADATA` (timestamps) and `commit_success.txt` (the path written to) still differ.
    `_checkpointer()` restores both layouts.
    """
    import orbax.checkpoint as ocp

    mp = _this_process_only()
    return ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(use_ocdbt=False, multiprocessing_options=mp),
        multiprocessing_options=mp,
    )


def _split_empty(tree: Any, prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """Orbax refuses zero-size arrays: take them out (recording shape/dtype) so they can be
    restored."""
    if isinstance(tree, dict):
        kept, empty = {}, {}
        for k, v in tree.items():
            sub, e = _split_empty(v, f"{prefix}{k}/")
            empty.update(e)
            if sub is not None:
                kept[k] = sub
        return kept, empty
    if tree.size == 0:
        return None, {prefix.rstrip("/"): {"shape": list(tree.shape), "dtype": str(tree.dtype)}}
    return tree, {}


def save_tree(path: str | Path, tree: dict[str, Any]) -> None:
    """Save a nested dict of arrays (numpy or jax; keys made strings) as one orbax item."""
    p = Path(path).absolute()
    kept, empty = _split_empty(_stringify(tree))
    import orbax.checkpoint as ocp

    _writer().save(p, args=ocp.args.PyTreeSave(kept), force=True)
    if empty:
        (p / EMPTY_ARRAYS_FILE).write_text(json.dumps(empty))


def load_tree(path: str | Path) -> dict[str, Any]:
    """Load an orbax item saved by `save_tree` as numpy arrays."""
    p = Path(path).absolute()
    if not p.exists():
        raise FileNotFoundError(f"{p}: checkpoint item is missing")
    tree = jax.tree.map(np.asarray, _checkpointer().restore(p))
    if (p / EMPTY_ARRAYS_FILE).is_file():
        for key, spec in json.loads((p / EMPTY_ARRAYS_FILE).read_text()).items():
            node = tree
            *parents, leaf = key.split("/")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = np.zeros(spec["shape"], np.dtype(spec["dtype"]))
    return tree


def intify_layer_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; NNX lists are keyed by int. Convert digit keys back."""
    if isinstance(tree, dict):
        return {
            (int(k) if isinstance(k, str) and k.isdigit() else k): intify_layer_keys(v)
            for k, v in tree.items()
        }
    return tree
