"""A small random MoE layer and its streamed problem, shared by the tests of the streamed stages
and of what runs on their output (`test_streamed.py`, `test_expert_scale_tuning.py`)."""

from __future__ import annotations

from collections import defaultdict

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.method import streamed
from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.method.expert_source import ArraySource
from bitsmoe_jax.method.layer_problem import LayerProblem
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import MoEBlock

E, D, F, N = 6, 24, 40, 300


def layer_config() -> ModelConfig:
    return ModelConfig(
        model_type="mixtral",
        vocab_size=128,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=F,
        moe_intermediate_size=F,
        num_experts=E,
        num_experts_per_tok=2,
    )


def make_layer():
    """(block, x, gate, up, down): a random MoE block whose expert 5 is routed almost nothing
    (the starved-expert fallback runs) and calibration inputs."""
    block = MoEBlock(layer_config(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(D, E)).astype(np.float32)
    kernel[0, 5] = -10.0  # with x[:, 0] = 5 below: expert 5 is starved
    block.router.kernel[...] = jnp.asarray(kernel)
    decay = np.exp(-np.arange(D) / 6.0)[:, None].astype(np.float32)
    gate = (rng.normal(size=(E, D, F)) * decay).astype(np.float32)
    up = (rng.normal(size=(E, D, F)) * decay).astype(np.float32)
    down = (rng.normal(size=(E, F, D)) / np.sqrt(F)).astype(np.float32)
    block.experts.gate[...] = jnp.asarray(gate)
    block.experts.up[...] = jnp.asarray(up)
    block.experts.down[...] = jnp.asarray(down)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, 0] = 5.0
    x[:3, 0] = -5.0  # ... but not quite: 3 tokens reach it
    x = jnp.asarray(x)
    return block, x, gate, up, down


def method_params(**kw) -> MethodConfig:
    return MethodConfig(**({"min_tokens": 16, "candidate_bits": (0, 1, 2, 3, 4, 8)} | kw))


def build_layer_problem(layer, params, chunk, store_dir=None, **kw) -> LayerProblem:
    block, x, gate, up, down = layer
    return streamed.build_problem(
        0,
        block,
        ArraySource(gate, up, down),
        x,
        params,
        layer_config(),
        defaultdict(float),
        chunk=chunk,
        store_dir=store_dir,
        **kw,
    )
