"""DeepSeek-V3 / R1: 61 layers (the first 3 dense), hidden 7168, 256 routed experts of 2048, top-8
chosen by sigmoid score + correction bias within 4 of 8 expert groups, 1 shared expert, MLA with
YaRN; weights shipped in fp8 e4m3 with 128×128 block scales.

Expects a Hugging Face checkpoint `deepseek-ai/DeepSeek-V3` (also `DeepSeek-V3-0324`,
`DeepSeek-V3.1`, `DeepSeek-R1`, `DeepSeek-R1-0528`: the same shapes), downloaded by you (this tool
never downloads): `config.json` with `n_routed_experts=256`, `topk_method="noaux_tc"`,
`quantization_config.weight_block_size=[128, 128]`, the 163 safetensors shards as released (fp8
weights + `weight_scale_inv`, dequantized block by block while streaming; a bf16 copy works too;
the multi-token-prediction layer 61 is skipped), `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/deepseek_v3.py \
        --config.model_path=/path/to/DeepSeek-V3 --config.calib_text=/path/to/text.txt

Why these settings: 256 experts at top-8 route 1/32 of the tokens to an average expert, so the
calibration is 256k tokens (~8k per average expert) and an expert needs 32 routed tokens before
its own statistics are used. Each of the 58 MoE layers holds 21 GiB of experts in bf16, so the
budget is per layer (`budget_scope="layer"`; a model-wide budget keeps every layer's allocation
problem until the end). The router and its correction bias are kept exact (float32). Evaluation
is off (the unquantized model would have to be in memory). Memory and time per layer at these
dimensions: docs/quantizing.md ("Memory at real dimensions").
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/deepseek_v3"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 262144
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
