"""The experts of one layer of a Hugging Face checkpoint, read a few at a time (`ExpertSource`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bitsmoe_jax.method.expert_source import PROJECTION_NAMES, ArraySource, ExpertSource
from bitsmoe_jax.models.config import ModelConfig
from conversion.hf_checkpoint import CheckpointError, HFCheckpoint
from conversion.key_maps import expert_matrices


class CheckpointSource:
    """One layer's experts of a Hugging Face directory, read expert by expert from their bytes.

    Both layouts: per-expert tensors (only the requested experts' tensors are read) and fused
    `experts.gate_up_proj` / `down_proj` (only their rows). Memory maps are released after every
    read, so pages read for one chunk do not stay resident through the next. `ckpt`: an open
    checkpoint to share between layers (its headers are parsed once).
    """

    def __init__(
        self, path: str | Path, layer: int, config: ModelConfig, ckpt: HFCheckpoint | None = None
    ):
        self.path = Path(path)
        self.layer = int(layer)
        self.num_experts = int(config.num_experts)
        self.shapes = {
            "gate": (config.hidden_size, config.moe_intermediate_size),
            "up": (config.hidden_size, config.moe_intermediate_size),
            "down": (config.moe_intermediate_size, config.hidden_size),
        }
        self._ckpt = ckpt if ckpt is not None else HFCheckpoint(self.path)
        self._keys = dict.fromkeys(self._ckpt.keys())

    def read(
        self, experts: Sequence[int], which: Sequence[str] = PROJECTION_NAMES
    ) -> dict[str, np.ndarray]:
        ids = [int(e) for e in experts]
        out = {}
        try:
            for p in which:
                mats = expert_matrices(
                    f"model.layers.{self.layer}.",
                    p,
                    self._keys,
                    self._ckpt.get,
                    self.num_experts,
                    ids,
                    self._ckpt.get_rows,
                )
                arr = np.empty((len(ids), *self.shapes[p]), np.float32)
                for j, e in enumerate(ids):
                    if mats[e].shape != self.shapes[p]:
                        raise CheckpointError(
                            f"{self.path}: {p} of expert {e} in layer {self.layer} has shape "
                            f"{mats[e].shape} in our layout, expected {self.shapes[p]} from "
                            "config.json"
                        )
                    arr[j] = mats[e]
                out[p] = arr
        finally:
            self._ckpt.release()
        return out


def layer_source(
    path: str | Path, index: int, config: ModelConfig, ckpt: HFCheckpoint | None, part: dict
) -> ExpertSource | None:
    """Where layer `index`'s routed experts are read from, or None for a dense layer: the
    checkpoint's bytes (`ckpt` given: a Hugging Face directory streamed without its experts), or
    the experts of the layer's params `part` (a converted checkpoint), popped so the dense params
    are what remains."""
    if index not in config.moe_layers:
        return None
    if ckpt is not None:
        return CheckpointSource(path, index, config, ckpt)
    held = part["mlp"].pop("experts")
    return ArraySource(held["gate"], held["up"], held["down"])
