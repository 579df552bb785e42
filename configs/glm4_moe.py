"""GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`): 92 layers (the first 3 dense), hidden 5120, 160
routed experts of 1536, top-8 by sigmoid score + correction bias, 1 shared expert, grouped-query
attention (96 heads, 8 KV heads of 128) with q/k/v biases, q/k norm and RoPE on half of each head.

Expects a Hugging Face checkpoint `zai-org/GLM-4.5` (also `GLM-4.6`, `GLM-4.5-Base`, and
`GLM-4.5-Air`: 46 layers, hidden 4096, 128 experts of 1408, first layer dense, no q/k norm), in
bf16 or the `-FP8` releases (block-scaled fp8, dequantized while streaming), downloaded by you (this
tool never downloads): `config.json` with `"model_type": "glm4_moe"`, safetensors shards (the
multi-token-prediction layer after the last one is skipped), `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/glm4_moe.py \
        --config.model_path=/path/to/GLM-4.5 --config.calib_text=/path/to/text.txt

Why these settings: 160 experts at top-8 route 1/20 of the tokens to an average expert, so 160k
calibration tokens give ~8k each; 32 routed tokens before an expert's own statistics are used.
89 MoE layers of 7.0 GiB of bf16 experts: a per-layer budget. The router and its correction bias
are kept exact (float32). Evaluation is off.
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/glm4_moe"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 163840
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
