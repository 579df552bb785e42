"""Qwen3-30B-A3B (128 experts of 768, hidden 2048, 48 layers).

Download `Qwen/Qwen3-30B-A3B-Base` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/qwen3_moe.py
    --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import large_model_config


def get_config():
    return large_model_config("out/qwen3_30b_a3b")
