"""Mixtral-8x7B: 32 layers, hidden 4096, 8 experts of 14336, top-2 (46.7B parameters).

Expects the Hugging Face checkpoint `mistralai/Mixtral-8x7B-v0.1` (or `-Instruct-v0.1`), downloaded
by you (this tool never downloads): 19 safetensors shards, `config.json` with
`num_local_experts=8`, `tokenizer.json`. Then:

    python -m bitsmoe_jax.quantize --config configs/mixtral.py \
        --config.model_path=/path/to/Mixtral-8x7B-v0.1 --config.calib_text=/path/to/text.txt

Why these settings: with 8 experts and top-2 every expert sees about a quarter of the tokens, so
64k calibration tokens give each expert ~16k routed tokens; a window of 2048 tokens (of Mixtral's
32k context) keeps positions realistic at a bounded activation cost. The calibration text must be
of the model's domain (general English web text for the base model): the shipped Shakespeare is not.
Evaluation needs the unquantized model in memory and is off; pass `--config.eval_text=...` to run it
on a machine that holds the model.
"""

from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = ""  # required
    c.output_dir = "out/mixtral_8x7b"
    c.calib_text = ""  # required: a text of the model's domain
    c.num_calib_tokens = 65536
    c.seq_len = 2048
    c.budget_bits = (2.0,)
    c.budget_scope = "layer"  # model scope keeps all 32 layers' problems in memory until the end
    c.eval_text = ""
    c.eval_max_tokens = 65536
    return c
