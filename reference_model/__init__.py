"""Tooling that made the shipped reference MoE (`bitsmoe_jax/assets/reference_moe`): its training,
its tokenizer and the count-based floors it must beat. Not part of the installed library."""
