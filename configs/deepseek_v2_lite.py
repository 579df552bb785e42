"""DeepSeek-V2-Lite (64 experts of 1408 + 2 shared, hidden 2048, 27 layers, MLA).

Download `deepseek-ai/DeepSeek-V2-Lite` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/deepseek_v2_lite.py --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required: --config.model_path=/path/to/the/downloaded/checkpoint
    c.output_dir = "out/deepseek_v2_lite"
    c.budget_bits = (2.0,)  # one budget keeps memory to the quantized model; several re-solve from one calibration but hold every layer's problem
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.group_size = 128
    c.allocator = "auto"  # MILP up to milp_max_units, certified greedy beyond
    c.eval_text = "shakespeare_test"
    c.eval_max_tokens = 65536
    c.dense_dtype = "bfloat16"
    return c
