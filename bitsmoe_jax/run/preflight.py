"""The run's pre-flight step: the checkpoint checked before any work (`conversion.preflight`)."""

from __future__ import annotations

from bitsmoe_jax.loading import checkpoint_kind
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.config_schema import RunConfig
from conversion.preflight import preflight


def check_quantizable(config: ModelConfig) -> None:
    """Refuse, before any work, an architecture whose experts the quantizers do not model."""
    if config.expert_bias or config.swiglu_limit:
        raise ValueError(
            f"model_type {config.model_type!r}: quantizing experts with biases and the clamped "
            "SwiGLU (GPT-OSS) is not supported yet — the calibration statistics, error feedback "
            "and quantized forward assume bias-free silu(g)·u experts. The model loads, "
            "converts, generates and evaluates (python -m conversion, bitsmoe_jax.load_model)."
        )


def check_checkpoint(run: RunConfig, config: ModelConfig, progress: bool = True) -> None:
    """Check `run.model_path` as `run.preflight` says, logging what was checked; raises
    `CheckpointError` (naming file and tensor) before the run has written anything.

    Every process checks the whole checkpoint, so that all of them stop on the same error instead
    of one process failing while the others wait for it at a barrier.
    """
    check_quantizable(config)
    if run.preflight == "off":
        return
    summary = preflight(
        run.model_path,
        config,
        check_values=run.preflight == "values",
        progress=progress and distributed.is_writer(),
        kind=checkpoint_kind(run.model_path),
    )
    if progress:
        distributed.log(summary.describe())
