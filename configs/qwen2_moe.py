"""Qwen1.5-MoE-A2.7B (60 experts of 1408 + a shared expert, hidden 2048, 24 layers).

Download `Qwen/Qwen1.5-MoE-A2.7B` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/qwen2_moe.py
    --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import large_model_config


def get_config():
    return large_model_config("out/qwen15_moe_a27b")
