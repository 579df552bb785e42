"""DeepSeek-V2-Lite (64 experts of 1408 + 2 shared, hidden 2048, 27 layers, MLA).

Download `deepseek-ai/DeepSeek-V2-Lite` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/deepseek_v2_lite.py
    --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import large_model_config


def get_config():
    return large_model_config("out/deepseek_v2_lite")
