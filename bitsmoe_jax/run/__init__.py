"""The run machinery of `python -m bitsmoe_jax.quantize`: the config schema, the layer loop and its
budgets (`driver`), the resumable work directory (`workdir`, `fingerprint`, `faults`), the outputs
and their reports (`outputs`, `report`), progress display."""
