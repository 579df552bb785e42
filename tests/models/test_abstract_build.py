"""Abstract models (`build_model(abstract=True)`, `assemble.build_layer`) skip the random init.

They are built under `shapes_only()`, which gives zeros instead of drawing from the RNG (drawing is
quadratic under `nnx.eval_shape`). The reference is the abstract model built the plain way,
`nnx.eval_shape` of the random initialiser: the same tree, shapes and dtypes for every family. A
concrete build after an abstract one must still be the seeded random model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitsmoe_jax.models import assemble
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import DecoderLayer, MoETransformer, build_model
from tests.conftest import FAMILIES, family_spec

transformers = pytest.importorskip("transformers")


def _config(family: str) -> ModelConfig:
    _, config_cls, kw = family_spec(family)
    return ModelConfig.from_hf(getattr(transformers, config_cls)(**kw).to_dict())


def _shapes(module: nnx.Module) -> tuple[object, list[tuple[str, tuple[int, ...], str]]]:
    graphdef, state = nnx.split(module)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return graphdef, [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype)) for p, x in leaves]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_abstract_model_has_the_random_models_tree(family, dtype):
    config = _config(family)
    plain = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0), dtype=dtype))
    ours = build_model(config, dtype=dtype, abstract=True)
    assert _shapes(ours) == _shapes(plain)
    layer = config.moe_layers[0]
    plain_layer = nnx.eval_shape(lambda: DecoderLayer(config, layer, rngs=nnx.Rngs(0), dtype=dtype))
    params = nnx.to_pure_dict(nnx.state(build_model(config, dtype=dtype).layers[layer]))
    built = assemble.build_layer(config, layer, params, dtype=dtype)
    assert _shapes(built) == _shapes(plain_layer)


def test_concrete_build_after_an_abstract_one_is_still_random():
    config = _config("mixtral")
    before = nnx.to_pure_dict(nnx.state(build_model(config, seed=3)))
    build_model(config, seed=3, abstract=True)
    after = nnx.to_pure_dict(nnx.state(build_model(config, seed=3)))
    experts = np.asarray(after["layers"][0]["mlp"]["experts"]["gate"])
    assert np.std(experts) > 0.01  # drawn, not the abstract build's zeros
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
