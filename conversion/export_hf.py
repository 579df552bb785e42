"""Flax model -> Hugging Face checkpoint (the reverse of `convert`), used to ship the reference
model.

Writes `config.json` (transformers-loadable), `model.safetensors` in the per-expert layout that
transformers itself saves, and copies tokenizer files when given. Written atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bitsmoe_jax.io.checkpoint import atomic_directory
from bitsmoe_jax.models.config import ModelConfig
from conversion.convert import iter_leaves, np_dtype
from conversion.hf_checkpoint import write_safetensors
from conversion.key_maps import TOP_LEVEL, write_param


def hf_state_dict(
    model: nnx.Module, config: ModelConfig, dtype: str = "bfloat16"
) -> dict[str, np.ndarray]:
    """All parameters under their Hugging Face names, cast to `dtype`."""
    dt = np_dtype(dtype)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    layers = pure.pop("layers")
    out: dict[str, np.ndarray] = {}
    for path, value in iter_leaves(pure):
        key, transpose = TOP_LEVEL[path]
        out[key] = value.T if transpose else value
    for i in range(config.num_hidden_layers):
        for path, value in iter_leaves(layers[i]):
            out.update(write_param(path, f"model.layers.{i}.", value, config.model_type))
    return {k: np.ascontiguousarray(v.astype(dt)) for k, v in out.items()}


def export_hf(
    model: nnx.Module,
    config: ModelConfig,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    extra_files: Iterable[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write an HF checkpoint directory loadable by `AutoModelForCausalLM.from_pretrained`."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(
            tmp / "model.safetensors",
            hf_state_dict(model, config, dtype),
            metadata={"format": "pt"},
        )
        hf = config.to_hf()
        hf["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
    return Path(out_dir)
