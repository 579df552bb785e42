"""The shipped reference MoE (Mixtral architecture, 3 layers, 16 experts) on CPU, in minutes."""

from bitsmoe_jax.quant.config_schema import default_config
from bitsmoe_jax.train_reference import REFERENCE_DIR


def get_config():
    c = default_config()
    c.model_path = str(REFERENCE_DIR)
    c.output_dir = "out/tiny"
    c.budget_bits = (2.0, 2.5, 3.0)
    c.num_calib_tokens = 16384
    c.seq_len = 256
    c.eval_text = "shakespeare_test"
    return c
