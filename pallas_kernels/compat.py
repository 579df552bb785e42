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
        raise ImportError(
            "this JAX exposes neither pallas.triton.CompilerParams nor "
            "pallas.gpu.TritonCompilerParams"
        )
    return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_modules() -> tuple[Any, Any]:
    """``(pltpu, PrefetchScalarGridSpec)`` — the grid spec lives in ``pallas.tpu`` in 0.10 and
    0.11."""
    from jax.experimental.pallas import tpu as pltpu

    spec = getattr(pltpu, "PrefetchScalarGridSpec", None)
    if spec is None:
        from jax.experimental import pallas as pl

        spec = pl.PrefetchScalarGridSpec
    return pltpu, spec


def tpu_compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic compiler params: ``pltpu.CompilerParams`` (0.10+) or ``pltpu.TPUCompilerParams``
    (older)."""
    from jax.experimental.pallas import tpu as pltpu

    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(dimension_semantics=dimension_semantics)


def gpu_export_target(device_kind: str = "NVIDIA H100", num_cores: int = 132) -> Any:
    """Context for lowering Pallas GPU kernels on a host without a GPU (``jax.export`` for
    ``cuda``).

    JAX 0.11 reads the target GPU from the abstract mesh's device, and refuses to lower the Triton
    backend without one. JAX 0.10 assumed sm_90 and needs nothing. This returns an abstract
    one-device mesh with an H100 where that API exists, else a null context.
    """
    import contextlib

    import jax

    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
    except ImportError:
        return contextlib.nullcontext()
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    if use is None:
        return contextlib.nullcontext()
    device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    # Auto axes: with the (default) Explicit ones, the kernel bodies' reductions pick up sharding
    # types
    auto = (jax.sharding.AxisType.Auto,)
    return use(AbstractMesh((1,), ("gpu",), axis_types=auto, abstract_device=device))
