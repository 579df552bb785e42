"""DeepSeek-V2-Lite: 27 layers (the first dense), hidden 2048, 64 routed experts of 1408, top-6,
2 shared experts, multi-head latent attention (MLA) with YaRN.

Expects the Hugging Face checkpoint `deepseek-ai/DeepSeek-V2-Lite` (or `-Chat`), downloaded by you
(this tool never downloads): `config.json` with `n_routed_experts=64`, `n_shared_experts=2`,
`first_k_dense_replace=1`, safetensors shards, `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/deepseek_v2_lite.py \
        --config.model_path=/path/to/DeepSeek-V2-Lite --config.calib_text=/path/to/text.txt

Why these settings: 64 experts at top-6 route ~1/11 of the tokens to an average expert, so 128k
calibration tokens give ~12k each; rare experts need 32 routed tokens before their own statistics
are used. The 26 MoE layers are small enough (1.0 GiB of experts each in bf16) for a model-wide
budget (`budget_scope="model"`), which spends bits where the loss is, across layers. Windows of
2048 tokens; evaluation off (it needs the unquantized model in memory).
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/deepseek_v2_lite"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 131072
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "model"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
