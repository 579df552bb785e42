"""Quantized checkpoint: packed expert factors + stored bases + the rest of the model, and its
loader.

Layout of a quantized directory (written atomically by the pipeline):

    quantized.json          format, model config, quantization config, per-layer factor layouts,
                            effective bits, package versions
    params/top/             orbax: embeddings, final norm, lm_head (bf16 by default)
    params/layer_000/       orbax: {"dense": non-expert params of the layer,
                                    "experts_q": bases + packed factors (MoE layers),
                                    "allocation": bits per unit [E, r_full] per projection (MoE
                                    layers)}
    tokenizer.json, ...     copied from the source so `evaluate` works on the directory
    report.json, report.md  written by the pipeline
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.io.checkpoint import intify_layer_keys, load_tree, save_tree
from bitsmoe_jax.models.assemble import model_from_parts
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts, set_backend

FORMAT_QUANTIZED = "bitsmoe-jax/quantized"
QUANT_META = "quantized.json"


def package_versions() -> dict[str, str]:
    out = {}
    for name in (
        "bitsmoe-jax",
        "jax",
        "jaxlib",
        "flax",
        "orbax-checkpoint",
        "numpy",
        "cvxpy",
        "highspy",
    ):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_layer(
    root: Path,
    index: int,
    dense: dict,
    experts: QuantizedExperts | None,
    allocation: dict[str, np.ndarray] | None,
) -> dict[str, Any] | None:
    """Write one layer's item; return the JSON metadata of its quantized experts (None if dense)."""
    tree: dict[str, Any] = {"dense": dense}
    meta = None
    if experts is not None:
        arrays, meta = experts.to_tree()
        tree["experts_q"] = arrays
        tree["allocation"] = {k: np.asarray(v, np.int8) for k, v in (allocation or {}).items()}
    save_tree(root / "params" / f"layer_{index:03d}", tree)
    return meta


def save_top(root: Path, top: dict) -> None:
    save_tree(root / "params" / "top", top)


def write_meta(
    root: Path, config: ModelConfig, quant_config: dict, layers: dict[int, Any], summary: dict
) -> None:
    meta = {
        "format": FORMAT_QUANTIZED,
        "version": 1,
        "config": json.loads(config.to_json()),
        "quantization": quant_config,
        "layers": {str(i): m for i, m in layers.items()},
        "summary": summary,
        "package_versions": package_versions(),
    }
    (root / QUANT_META).write_text(json.dumps(meta, indent=1, default=json_default))


def json_default(o: Any) -> Any:
    """`json.dumps`'s `default` for the numpy scalars and arrays our metadata holds."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / QUANT_META
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not a quantized checkpoint (no {QUANT_META})")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT_QUANTIZED:
        raise ValueError(
            f"{p}: unknown format {meta.get('format')!r} (expected {FORMAT_QUANTIZED})"
        )
    return meta


def load_allocation(path: str | Path, index: int) -> dict[str, np.ndarray]:
    """Bits per unit of a layer, [E, r_full] per projection."""
    return load_tree(Path(path) / "params" / f"layer_{index:03d}")["allocation"]


def load_quantized(
    path: str | Path,
    dtype: Any = jnp.float32,
    backend: str = "auto",
    max_padding: float = 0.05,
):
    """A model with quantized experts, same call contract as `load_model`: returns (model, config).

    ``backend`` selects the routed-expert backend (`quantized_experts.QuantizedExperts`): ``"xla"``,
    ``"triton"``, ``"mosaic_tpu"``, ``"reference"`` or ``"auto"`` (the platform's kernels where they
    are verified, else XLA); a kernel layout is derived here, padded to shapes shared by the layers
    (at most ``max_padding`` extra device memory per group: see `quantized_experts.set_backend`).
    """
    p = Path(path)
    meta = read_meta(p)
    config = ModelConfig.from_json(json.dumps(meta["config"]))
    parts: dict[Any, dict] = {"top": load_tree(p / "params" / "top")}
    experts: dict[int, QuantizedExperts] = {}
    for i in range(config.num_hidden_layers):
        tree = load_tree(p / "params" / f"layer_{i:03d}")
        parts[i] = intify_layer_keys(tree["dense"])
        if "experts_q" in tree:
            experts[i] = QuantizedExperts.from_tree(tree["experts_q"], meta["layers"][str(i)])
    model = model_from_parts(config, parts, dtype, experts=experts)
    set_backend(model, backend, max_padding=max_padding)
    return model, config
