"""Llama 4 (text): Llama-4-Scout-17B-16E has 48 MoE layers of 16 experts, Llama-4-Maverick-17B-128E
48 layers alternating dense and MoE (24 of 128 experts); hidden 5120, experts and the one shared
expert of width 8192, dense layers of 16384, top-1 routing whose sigmoid score scales the expert's
input, GQA attention (40 heads, 8 KV heads of 128) chunked to 8192 tokens on three layers of four
and global without RoPE (temperature-tuned) on the fourth.

Expects a Hugging Face checkpoint `meta-llama/Llama-4-Scout-17B-16E(-Instruct)` or
`meta-llama/Llama-4-Maverick-17B-128E(-Instruct)` as released, downloaded by you (this tool never
downloads): the image-text `config.json` (`"model_type": "llama4"`, read through its
`text_config`), bf16 safetensors shards whose `language_model.*` tensors are converted (the vision
tower is skipped, and not in the output), `tokenizer.json`. A text-only `Llama4ForCausalLM` save
works too. Then:

    python -m bitsmoe_jax.quantize --config configs/llama4.py \
        --config.model_path=/path/to/Llama-4-Scout-17B-16E --config.calib_text=/path/to/text.txt

Why these settings: top-1 over 16 experts routes 1/16 of the tokens to an average expert, so 64k
calibration tokens give ~4k each (Maverick, 128 experts: pass `--config.num_calib_tokens=524288`);
32 routed tokens before an expert's own statistics are used. The calibration statistics see what
the experts see: each token scaled by its router score, its output summed unweighted. Evaluation is
off (the unquantized model would have to be in memory). Baselines: round-to-nearest only (GPTQ's
and the k-quants' statistics assume routers that weight the experts' outputs and are refused for
this family). The FP8 Maverick release (`-FP8`, compressed-tensors) is not read: use the bf16 one.
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/llama4"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.min_tokens = 32
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
