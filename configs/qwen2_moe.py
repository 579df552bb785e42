"""Qwen1.5-MoE-A2.7B (Qwen2-MoE): 24 layers, hidden 2048, 60 experts of 1408, top-4, plus a gated
shared expert of 5632.

Expects the Hugging Face checkpoint `Qwen/Qwen1.5-MoE-A2.7B`, downloaded by you (this tool never
downloads): `config.json` with `num_experts=60` and `shared_expert_intermediate_size=5632`,
safetensors shards, `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/qwen2_moe.py \
        --config.model_path=/path/to/Qwen1.5-MoE-A2.7B --config.calib_text=/path/to/text.txt

Why these settings: 60 experts at top-4 route 1/15 of the tokens to an average expert, so 96k
calibration tokens give ~6k each. The shared expert stays in bf16 with the other dense weights
(`dense_dtype`). Windows of 2048 tokens; evaluation off (it needs the unquantized model in memory).
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/qwen1.5_moe_a2.7b"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 98304
    c.seq_len = 2048
    c.min_tokens = 24
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
