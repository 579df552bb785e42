"""Mixtral-8x7B (8 experts of 14336, hidden 4096, 32 layers).

Download `mistralai/Mixtral-8x7B-v0.1` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/mixtral.py
    --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import large_model_config


def get_config():
    return large_model_config("out/mixtral_8x7b")
