"""Version shims for the Pallas APIs that moved between JAX 0.10 and 0.11."""

from __future__ import annotations

from typing import Any


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params: ``pallas.triton.CompilerParams`` (0.10, 0.11) or the older
    ``pallas.gpu.TritonCompilerParams``; one clear error if neither exists."""
    try:
        from jax.experimental.pallas import triton as plt

        cls = getattr(plt, "CompilerParams", None)
    except ImportError:
        cls = None
    if cls is None:
        try:
            from jax.experimental.pallas import gpu as plgpu

            cls = getattr(plgpu, "TritonCompilerParams", None)
        except ImportError:
            cls = None
    if cls is None:
        raise ImportError("this JAX exposes neither pallas.triton.CompilerParams nor pallas.gpu.TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_modules() -> tuple[Any, Any]:
    """``(pltpu, PrefetchScalarGridSpec)`` — the grid spec lives in ``pallas.tpu`` in 0.10 and 0.11."""
    from jax.experimental.pallas import tpu as pltpu

    spec = getattr(pltpu, "PrefetchScalarGridSpec", None)
    if spec is None:
        from jax.experimental import pallas as pl

        spec = getattr(pl, "PrefetchScalarGridSpec")
    return pltpu, spec


def tpu_compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic compiler params: ``pltpu.CompilerParams`` (0.10+) or ``pltpu.TPUCompilerParams`` (older)."""
    from jax.experimental.pallas import tpu as pltpu

    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    return cls(dimension_semantics=dimension_semantics)
