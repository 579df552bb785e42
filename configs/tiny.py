"""The shipped reference MoE (`bitsmoe_jax/assets/reference_moe`: Mixtral architecture, 3 layers,
hidden 256, 16 experts of 256, top-2, trained on Shakespeare) on CPU, in minutes.

It calibrates on the Shakespeare training split and evaluates on the test split (both shipped), at
three budgets from one calibration."""

from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.run.config_schema import default_config


def get_config():
    c = default_config()
    c.model_path = str(REFERENCE_DIR)
    c.output_dir = "out/tiny"
    c.budget_bits = (2.0, 2.5, 3.0)
    c.num_calib_tokens = 16384
    c.seq_len = 256
    c.eval_text = "shakespeare_test"
    return c
