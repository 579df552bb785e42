"""The run's pre-flight step: the checkpoint checked before any work (`conversion.preflight`)."""

from __future__ import annotations

from bitsmoe_jax.loading import checkpoint_kind
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.config_schema import RunConfig
from conversion.preflight import preflight

# Methods that model GPT-OSS's biased, clamped experts and Llama 4's input-scaling router: BitsMoE
# (its statistics, error feedback and forward take the biases, the activation and the experts'
# actual inputs) and round-to-nearest (which needs no statistics).
GLU_METHODS = ("bitsmoe", "rtn", "rtn_asym")


def check_quantizable(config: ModelConfig, method: str) -> None:
    """Refuse, before any work, a method whose statistics do not model the experts' activation or
    routing."""
    if method in GLU_METHODS:
        return
    if config.expert_bias or config.swiglu_limit:
        raise ValueError(
            f"method {method!r} on model_type {config.model_type!r}: its calibration statistics "
            "assume bias-free silu(g)·u experts, not GPT-OSS's biased, clamped ones; use one of "
            f"{', '.join(GLU_METHODS)}"
        )
    if config.router_scales_input:
        raise ValueError(
            f"method {method!r} on model_type {config.model_type!r}: its calibration statistics "
            "assume routers that weight the experts' outputs, not Llama 4's, whose scores scale "
            f"the experts' inputs; use one of {', '.join(GLU_METHODS)}"
        )


def check_checkpoint(run: RunConfig, config: ModelConfig, progress: bool = True) -> None:
    """Check `run.model_path` as `run.preflight` says, logging what was checked; raises
    `CheckpointError` (naming file and tensor) before the run has written anything.

    Every process checks the whole checkpoint, so that all of them stop on the same error instead
    of one process failing while the others wait for it at a barrier.
    """
    check_quantizable(config, run.method)
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
