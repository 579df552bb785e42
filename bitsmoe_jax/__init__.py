"""bitsmoe-jax: BitsMoE post-training quantization of Mixture-of-Experts LLMs in JAX/Flax."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load_model", "load_quantized", "quantize_checkpoint", "ModelConfig"]


def __getattr__(name: str):
    # Lazy so that `import bitsmoe_jax.models` (used by conversion/) never imports conversion/ back.
    if name == "load_model":
        from bitsmoe_jax.loading import load_model

        return load_model
    if name == "load_quantized":
        from bitsmoe_jax.serve.quantized_checkpoint import load_quantized

        return load_quantized
    if name == "quantize_checkpoint":
        from bitsmoe_jax.run.entry import quantize_checkpoint

        return quantize_checkpoint
    if name == "ModelConfig":
        from bitsmoe_jax.models.config import ModelConfig

        return ModelConfig
    raise AttributeError(name)
