"""Flax NNX MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2) sharing one set of blocks."""

from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import MoETransformer, build_model

__all__ = ["ModelConfig", "MoETransformer", "build_model"]
