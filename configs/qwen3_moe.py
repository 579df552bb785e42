"""Qwen3-30B-A3B: 48 layers, hidden 2048, 128 experts of 768, top-8, no shared expert.

Expects the Hugging Face checkpoint `Qwen/Qwen3-30B-A3B-Base` (or `Qwen/Qwen3-30B-A3B`), downloaded
by you (this tool never downloads): `config.json` with `num_experts=128` (transformers 5 writes
`num_local_experts`; both are read), safetensors shards, `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/qwen3_moe.py \
        --config.model_path=/path/to/Qwen3-30B-A3B-Base --config.calib_text=/path/to/text.txt

Why these settings: 128 experts at top-8 route 1/16 of the tokens to an average expert and far fewer
to rare ones, so the calibration is twice Mixtral's (128k tokens, ~8k per average expert) and an
expert needs 32 routed tokens before its own statistics are used (`min_tokens`). Windows of 2048
tokens. Evaluation is off (the unquantized model would have to be in memory).
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/qwen3_30b_a3b"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 131072
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
