"""GPT-OSS (`GptOssForCausalLM`): gpt-oss-20b has 24 layers of 32 experts, gpt-oss-120b 36 layers
of 128; hidden 2880, experts of width 2880 with biases and a clamped SwiGLU, top-4 routing by a
biased router, GQA attention (64 heads, 8 KV heads of 64) with sinks, sliding-window (128) layers
alternating with full ones; the experts shipped in MXFP4.

Expects a Hugging Face checkpoint `openai/gpt-oss-20b` or `openai/gpt-oss-120b` as released (the
MXFP4 `*_blocks` / `*_scales` expert tensors are decoded exactly while streaming; a bf16 copy with
fused `experts.gate_up_proj` works too), downloaded by you (this tool never downloads):
`config.json` with `"model_type": "gpt_oss"`, safetensors shards, `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/gpt_oss.py \
        --config.model_path=/path/to/gpt-oss-20b --config.calib_text=/path/to/text.txt

Why these settings: 32 experts at top-4 route 1/8 of the tokens to an average expert, so 64k
calibration tokens give ~8k each (gpt-oss-120b, 128 experts: pass
`--config.num_calib_tokens=262144`); 32 routed tokens before an expert's own statistics are used.
The experts' biases and the router stay bf16 as released (counted with the dense parameters in
`effective_bpw_model`); the calibration statistics, error feedback and the quantized forward run
GPT-OSS's biases and clamp. Quantized GPT-OSS experts are served by the "xla" backend (the Pallas
kernels compute bias-free SwiGLU experts). Evaluation is off (the unquantized model would have to
be in memory). Baselines: round-to-nearest only (GPTQ's and the k-quants' statistics assume
silu(g)·u experts and are refused for this family).
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/gpt_oss"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
