"""The run's pre-flight step: the checkpoint checked before any work (`conversion.preflight`)."""

from __future__ import annotations

from bitsmoe_jax.loading import checkpoint_kind
from bitsmoe_jax.method.expert_source import host_memory_bytes
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import build_model, count_params
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.budgets import budget_dirs
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


def evaluation_bytes(config: ModelConfig, budget_bits: float) -> tuple[int, int]:
    """(bytes of the unquantized reference model, of the quantized model) that the evaluation after
    writing holds at once on process 0: both are loaded whole (`run/evaluation.py`), the reference
    in float32 and the quantized model's other weights in float32 with its routed experts at
    about `budget_bits` each."""
    total = count_params(build_model(config, abstract=True))
    routed = (
        len(config.moe_layers)
        * config.num_experts
        * 3
        * config.hidden_size
        * config.moe_intermediate_size
    )
    return 4 * total, 4 * (total - routed) + int(routed * budget_bits / 8)


def check_evaluation_fits(run: RunConfig, config: ModelConfig) -> None:
    """Refuse, before any work, an evaluation that cannot fit: it comes after every layer has been
    quantized and written, and would otherwise run out of memory hours into a large model's run.
    Process 0 (which evaluates) decides, with its memory, for every process."""
    if not run.eval_text:
        return
    msg = ""
    if distributed.is_writer():
        ref, quant = evaluation_bytes(config, max(b for b, _ in budget_dirs(run)))
        host = host_memory_bytes(run.host_memory_gb)
        source = "host_memory_gb" if run.host_memory_gb else "available now"
        if ref + quant > host:
            gib = 1 << 30
            msg = (
                f"eval_text={run.eval_text!r}: the evaluation after writing loads the whole "
                f"unquantized model in float32 ({ref / gib:.1f} GiB) and the quantized model "
                f"(~{quant / gib:.1f} GiB) on process 0, more than its {host / gib:.1f} GiB of "
                f"host memory ({source}); set --config.eval_text= to skip it, and evaluate the "
                "output later on a larger host (python -m bitsmoe_jax.evaluate --model OUT "
                "--reference MODEL --text TEXT)"
            )
    msg = distributed.text_from_writer("evaluation_fits", msg)
    if msg:
        raise ValueError(msg)


def check_checkpoint(run: RunConfig, config: ModelConfig, progress: bool = True) -> None:
    """Check `run.model_path` as `run.preflight` says, logging what was checked; raises
    `CheckpointError` (naming file and tensor) before the run has written anything.

    Every process checks the whole checkpoint, so that all of them stop on the same error instead
    of one process failing while the others wait for it at a barrier.
    """
    check_quantizable(config, run.method)
    check_evaluation_fits(run, config)
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
