"""Qwen3-Next-80B-A3B: 48 layers, hidden 2048, 512 experts of 512 plus a gated shared expert of
512, top-10; three layers in four mix tokens by Gated DeltaNet (linear attention: a recurrent
state per head instead of a KV cache), the fourth by gated full attention (16 heads, 2 KV heads of
256, RoPE on a quarter of each head).

Expects the Hugging Face checkpoint `Qwen/Qwen3-Next-80B-A3B-Instruct` (or `-Thinking`),
downloaded by you (this tool never downloads): `config.json` with `"model_type": "qwen3_next"`,
bf16 safetensors shards with per-expert tensors, `tokenizer.json`. Its multi-token-prediction head
(`mtp.*`) is skipped, as transformers skips it. The `-FP8` release stores 128×128 block-scaled
e4m3 weights with `weight_scale_inv`, the DeepSeek-V3 format the reader dequantizes while
streaming; only the bf16 layout is tested with this family. Then:

    python -m bitsmoe_jax.quantize --config configs/qwen3_next.py \
        --config.model_path=/path/to/Qwen3-Next-80B-A3B-Instruct \
        --config.calib_text=/path/to/text.txt

Why these settings: 512 experts at top-10 route 1/51 of the tokens to an average expert, so 262k
calibration tokens give ~5k each; 32 routed tokens before an expert's own statistics are used. The
routed experts are quantized; the linear-attention and attention weights, the shared expert and
its gate, the router and the norms stay at the dense dtype. Windows of 2048 tokens. Evaluation is
off (the unquantized model would have to be in memory).
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/qwen3_next_80b_a3b"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 262144
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
