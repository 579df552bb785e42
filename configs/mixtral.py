"""Mixtral-8x7B (8 experts of 14336, hidden 4096, 32 layers).

Download `mistralai/Mixtral-8x7B-v0.1` yourself (this tool never downloads), then:

    python -m bitsmoe_jax.quantize --config configs/mixtral.py --config.model_path=/path/to/checkpoint
"""

from bitsmoe_jax.quant.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required: --config.model_path=/path/to/the/downloaded/checkpoint
    c.output_dir = "out/mixtral_8x7b"
    c.budget_bits = (2.0,)  # one budget keeps memory to the quantized model; several re-solve from one calibration but hold every layer's problem
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.group_size = 128
    c.allocator = "auto"  # MILP up to milp_max_units, certified greedy beyond
    c.eval_text = "shakespeare_test"
    c.eval_max_tokens = 65536
    c.dense_dtype = "bfloat16"
    return c
