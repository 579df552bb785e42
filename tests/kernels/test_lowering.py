"""The kernels lower for real hardware at full layer shapes (``jax.export``, nothing allocated).

Interpret mode ignores TPU tiling rules (last two block dims divisible by 8 and 128 or equal to the
array's) and Triton's; lowering enforces what JAX checks before handing the kernel to Mosaic /
Triton. Shapes: Mixtral-8x7B (D = 4096, F = 14336, E = 8, top-2) and Qwen3-30B-A3B (D = 2048,
F = 768, E = 128, top-8) layers at full rank (r = D), decode (1 token) and prefill (512 tokens),
bf16 activations, each family with its default tiles; layouts are `jax.ShapeDtypeStruct`s with the
index tables of a random 2.5-bit allocation. On GPU, 1 token lowers the decode GEMVs and 512 tokens
the prefill path (the dequantizing kernel, then ``ragged_dot``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import shared_shapes
from pallas_kernels.api import DEFAULT_TILES, ExpertKernels, swiglu_experts
from pallas_kernels.lowered import export_for_hardware
from pallas_kernels.mosaic_tpu.layout import synthetic_plane_tiles
from pallas_kernels.tiles import random_allocation
from pallas_kernels.triton.layout import synthetic_code_tiles

SHAPES = {"mixtral_8x7b": (8, 4096, 14336, 2), "qwen3_30b_a3b": (128, 2048, 768, 8)}


@functools.cache
def abstract_kernels(shape: str, backend: str) -> ExpertKernels:
    e, d, f, _ = SHAPES[shape]
    bits = [random_allocation(e, d, 2.5, seed=i) for i in range(3)]
    if backend == "triton":
        parts = [
            synthetic_code_tiles(b, f, tile=DEFAULT_TILES[backend].tile, abstract=True)
            for b in bits
        ]
    else:
        parts = [
            synthetic_plane_tiles(b, f, o, DEFAULT_TILES[backend], abstract=True)
            for b, o in zip(bits, ("rows", "rows", "lanes"), strict=False)
        ]
    return shared_shapes.abstract(ExpertKernels(*parts))


@pytest.mark.parametrize("tokens", [1, 512])
@pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_exports_for_hardware(shape, backend, tokens):
    e, d, _, top_k = SHAPES[shape]
    m = tokens * top_k
    fn = jax.jit(functools.partial(swiglu_experts, backend=backend, interpret=False))
    z = jax.ShapeDtypeStruct((m, d), jnp.bfloat16)
    exported = export_for_hardware(
        fn, backend, z, z, jax.ShapeDtypeStruct((e,), jnp.int32), abstract_kernels(shape, backend)
    )
    text = exported.mlir_module()
    assert ("tpu_custom_call" if backend == "mosaic_tpu" else "xla.gpu.triton") in text
    if backend == "triton":  # the decode GEMVs, or the prefill dequantizer
        names = (
            ("bitsmoe_gate_up_codes", "bitsmoe_down_codes")
            if tokens == 1
            else ("bitsmoe_dequantize_tiles",)
        )
        assert all(n in text for n in names), names
    assert exported.out_avals[0].shape == (m, d)
