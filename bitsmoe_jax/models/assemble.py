"""Models assembled from param trees of numpy arrays, without random initialisation.

The abstract model (`nnx.eval_shape`) is filled with the given arrays, cast to the requested dtype,
so no initialiser is ever computed and the weights are never held twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.io.checkpoint import intify_layer_keys
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.layers import shapes_only
from bitsmoe_jax.models.transformer import DecoderLayer, MoETransformer, build_model

# Parameters that keep float32 in a model of any dtype, as transformers keeps them: the sigmoid
# router's selection bias decides the top-k among scores that differ in the 3rd-4th digit.
FLOAT32_PARAMS = ("e_score_correction_bias",)


def leaf_dtype(path: tuple, dtype: Any) -> Any:
    """The dtype a param is held or stored in: `dtype`, but float32 for `FLOAT32_PARAMS`.
    `path`: a jax key path or a tuple of names."""
    name = getattr(path[-1], "key", path[-1]) if path else None
    return np.float32 if name in FLOAT32_PARAMS else dtype


def cast_params(tree: Any, dtype: Any) -> Any:
    """Every array of a param tree as a jax array of `leaf_dtype`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(a, dtype=leaf_dtype(path, dtype)), tree
    )


def model_from_parts(
    config: ModelConfig,
    parts: dict[Any, dict],
    dtype: Any,
    experts: dict[int, nnx.Module] | None = None,
) -> MoETransformer:
    """Assemble a model from {'top': {...}, 0: layer0, ...} param trees of numpy arrays.

    `experts` replaces the routed-expert module of the given MoE layers (the quantized checkpoint's
    `QuantizedExperts`); their layer trees then carry no `mlp.experts` entry.
    """
    model = build_model(config, dtype=dtype, abstract=True)
    for i, module in (experts or {}).items():
        model.layers[i].mlp.experts = module
    graphdef, state = nnx.split(model)
    pure: dict[Any, Any] = dict(parts["top"])
    pure["layers"] = {i: parts[i] for i in range(config.num_hidden_layers)}
    nnx.replace_by_pure_dict(state, cast_params(intify_layer_keys(pure), dtype))
    return nnx.merge(graphdef, state)


def build_layer(
    config: ModelConfig, index: int, params: dict, dtype: Any = jnp.float32
) -> DecoderLayer:
    """One decoder layer with the given params (used by layer-by-layer calibration)."""
    with shapes_only():
        layer = nnx.eval_shape(lambda: DecoderLayer(config, index, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(layer)
    nnx.replace_by_pure_dict(state, cast_params(intify_layer_keys(params), dtype))
    return nnx.merge(graphdef, state)
