"""Qwen1.5-MoE-A2.7B (60 experts of 1408 + a shared expert, hidden 2048, 24 layers).

Download `Qwen/Qwen1.5-MoE-A2.7B` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/qwen2_moe.py --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required: --config.model_path=/path/to/the/downloaded/checkpoint
    c.output_dir = "out/qwen15_moe_a27b"
    c.budget_bits = (2.0,)  # one budget keeps memory to the quantized model; several re-solve from one calibration but hold every layer's problem
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.group_size = 128
    c.allocator = "auto"  # MILP up to milp_max_units, certified greedy beyond
    c.eval_text = "shakespeare_test"
    c.eval_max_tokens = 65536
    c.dense_dtype = "bfloat16"
    return c
