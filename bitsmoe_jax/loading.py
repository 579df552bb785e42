"""`load_model(path)`: a Flax model from a Hugging Face, converted or quantized directory.

Parameters are read a part at a time (top-level weights, then each layer) and cast to the requested
dtype, then placed into an abstract model (`nnx.eval_shape`), so no random initialisation is ever
computed and the weights are never held twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.io.checkpoint import FORMAT_CONVERTED, META_FILE, intify_layer_keys, load_tree
from bitsmoe_jax.models.assemble import model_from_parts
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import MoETransformer
from bitsmoe_jax.serve.quantized_checkpoint import load_quantized
from conversion.convert import iter_parts


def checkpoint_kind(path: str | Path) -> str:
    """'converted', 'quantized' or 'hf' — or a clear error saying what the directory lacks."""
    p = Path(path)
    if (p / META_FILE).is_file():
        meta = json.loads((p / META_FILE).read_text())
        return "converted" if meta.get("format") == FORMAT_CONVERTED else str(meta.get("format"))
    if (p / "quantized.json").is_file():
        return "quantized"
    if (p / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(
        f"{p}: not a model directory (expected {META_FILE} of a converted checkpoint, "
        "quantized.json, "
        "or a Hugging Face config.json)"
    )


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF, converted or quantized directory, without reading weights."""
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "hf":
        return ModelConfig.from_hf_dir(p)
    meta_file = p / (META_FILE if kind == "converted" else "quantized.json")
    return ModelConfig.from_json(json.dumps(json.loads(meta_file.read_text())["config"]))


def iter_model_parts(
    path: str | Path, experts: Sequence[int] | None = None
) -> Iterator[tuple[str | int, dict]]:
    """Stream ("top", params), then (i, layer_params) for every layer, from an HF or converted
    directory.

    Only one part is in memory at a time (float32 numpy), which is what layer-by-layer
    quantization of models larger than RAM relies on. `experts` (HF directories): read only these
    routed experts' weights, the others' entries being zeros (none: no `mlp.experts` entry) — a
    converted (orbax) directory is read whole.
    """
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "hf":
        yield from iter_parts(p, "float32", experts=experts)
    elif kind == "converted":
        config = model_config(p)
        yield (
            "top",
            jax.tree.map(lambda a: np.asarray(a, np.float32), load_tree(p / "params" / "top")),
        )
        for i in range(config.num_hidden_layers):
            yield (
                i,
                intify_layer_keys(
                    jax.tree.map(
                        lambda a: np.asarray(a, np.float32),
                        load_tree(p / "params" / f"layer_{i:03d}"),
                    )
                ),
            )
    else:
        raise ValueError(
            f"{p}: expected a Hugging Face or converted checkpoint to quantize, found {kind!r}"
        )


def load_model(path: str | Path, dtype: Any = jnp.float32) -> tuple[MoETransformer, ModelConfig]:
    """Load a model for inference: `logits = model(input_ids)` (int32 [B, T] -> float32 [B, T,
    V])."""
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "hf":
        config = ModelConfig.from_hf_dir(p)
        parts = {name: part for name, part in iter_parts(p, "float32", config)}
        return model_from_parts(config, parts, dtype), config
    if kind == "converted":
        meta = json.loads((p / META_FILE).read_text())
        config = ModelConfig.from_json(json.dumps(meta["config"]))
        parts: dict[Any, dict] = {"top": load_tree(p / "params" / "top")}
        for i in range(config.num_hidden_layers):
            parts[i] = load_tree(p / "params" / f"layer_{i:03d}")
        return model_from_parts(config, parts, dtype), config
    if kind == "quantized":
        return load_quantized(p, dtype=dtype)
    raise ValueError(f"{p}: unknown checkpoint format {kind!r}")
