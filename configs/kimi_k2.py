"""Kimi-K2: the DeepSeek-V3 architecture at 1T parameters — 61 layers (the first dense), hidden
7168, 384 routed experts of 2048, top-8 by sigmoid score + correction bias (one expert group),
1 shared expert, 64-head MLA with YaRN; weights in fp8 e4m3 with 128×128 block scales.

Expects a Hugging Face checkpoint `moonshotai/Kimi-K2-Instruct` (or `Kimi-K2-Base`,
`Kimi-K2-Instruct-0905`), downloaded by you (this tool never downloads): `config.json` with
`"model_type": "kimi_k2"` (read as DeepSeek-V3; the remote-code files are not needed),
`n_routed_experts=384`, the safetensors shards as released (fp8 + `weight_scale_inv`), and
`tiktoken.model` converted to a `tokenizer.json` (Kimi ships a tiktoken vocabulary; set
`--config.tokenizer=` to a directory holding the converted file). Then:

    python -m bitsmoe_jax.quantize --config configs/kimi_k2.py \
        --config.model_path=/path/to/Kimi-K2-Instruct --config.calib_text=/path/to/text.txt

Why these settings: 384 experts at top-8 route 1/48 of the tokens to an average expert, so the
calibration is 384k tokens (~8k per average expert); 32 routed tokens before an expert's own
statistics are used. 60 MoE layers of 31.5 GiB of bf16 experts each: a per-layer budget. The
router and its correction bias are kept exact (float32). Evaluation is off.
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/kimi_k2"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 393216
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
