"""Layouts padded to a shared shape (`pallas_kernels.shared_shapes`) compute the same products.

The products are checked against the pure-jnp reference on the *stored* factors (not against the
unpadded layout): four projection sets with different bit mixes (one with 16-bit units, one with
fewer tiles per expert, one with fewer components) padded to their merged shape, both kernel
families, decode and prefill paths. The shapes planned from the
bit-widths alone (`expert_kernel_shapes`) must be exactly those the builders produce, or padding
to them would fail; the grouping must respect its padding bound and never merge unlike statics.
The model-level check (layers lowering to shared kernel calls) is in `test_model_paths.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import shared_shapes
from pallas_kernels.api import (
    ExpertKernels,
    build_expert_kernels,
    expert_kernel_shapes,
    swiglu_experts,
)
from pallas_kernels.lowered import kernel_configs
from pallas_kernels.reference import swiglu_experts_reference
from pallas_kernels.triton.layout import CodeConfig, synthetic_code_tiles
from tests.kernels.conftest import CODES, TILES, E, R, assert_position_maps, projections

CFG = {"triton": CODES, "mosaic_tpu": TILES}
# (seed, with 16-bit units, half the units at 0 bits, rank): the third has fewer tiles per expert,
# so padding it adds tiles (L) and moves the "not in the kernel" column of comp_pos; the fourth kept
# fewer components (a smaller rank, padded with components in no tile)
CASES = ((0, False, False, R), (1, True, False, R), (2, False, True, R), (3, False, False, R - 16))


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("case", CASES)
def test_shapes_from_bit_widths_are_the_built_shapes(backend, case):
    packed, _ = projections(*case)
    built = build_expert_kernels(packed, E, backend, CFG[backend])
    assert expert_kernel_shapes(packed, E, backend, CFG[backend]) == shared_shapes.abstract(built)


@pytest.mark.parametrize("backend,tm", [("triton", None), ("triton", 16), ("mosaic_tpu", None)])
def test_padded_layouts_give_the_reference_products(backend, tm):
    shapes = [
        expert_kernel_shapes(projections(*case)[0], E, backend, CFG[backend]) for case in CASES
    ]
    assert len({k.down.max_tiles for k in shapes}) > 1 and len({k.down.r for k in shapes}) > 1
    plan = shared_shapes.plan_groups([k.parts() for k in shapes], max_padding=math.inf)
    assert plan.num_groups == 1 and plan.padding > 0  # unlike shapes, merged
    target = ExpertKernels(*plan.targets[0])
    rng = np.random.default_rng(3)
    zg, zu = (jnp.asarray(rng.standard_normal((24, R)), jnp.float32) for _ in range(2))
    sizes = jnp.asarray([5, 0, 3, 3, 0, 6, 4, 3], jnp.int32)
    for case in CASES:
        packed, dense = projections(*case)
        rank = case[-1]
        kern = build_expert_kernels(packed, E, backend, CFG[backend], target=target)
        assert shared_shapes.abstract(kern) == target
        for p, layout in zip(("gate", "up", "down"), kern.parts(), strict=False):
            bits = np.pad(
                packed[p].bits_per_unit().reshape(E, rank), ((0, 0), (0, R - rank))
            )  # padded: 0 bits
            assert_position_maps(layout, bits)
        # a padded rank: zero activation columns in, the extra output columns dropped
        zpad = [z.at[:, rank:].set(0.0) for z in (zg, zu)]
        got = swiglu_experts(
            *zpad, sizes, jax.tree.map(jnp.asarray, kern), backend=backend, interpret=True, tm=tm
        )[:, :rank]
        want = swiglu_experts_reference(
            zg[:, :rank], zu[:, :rank], sizes, *(dense[p] for p in ("gate", "up", "down"))
        )
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * scale, (backend, case)


def _layer(bits_by_proj, n=512, tile=128):
    return tuple(synthetic_code_tiles(b, n, tile=tile, abstract=True) for b in bits_by_proj)


def _layers(count: int, tile: int = 128):
    """Synthetic layers: each projection 8 experts × 256 components, a random mix per layer."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        widths = [1, 2, 3, 4, 8][: 2 + i % 4]
        out.append(_layer([rng.choice(widths, size=(8, 256)) for _ in range(3)], tile=tile))
    return out


def test_grouping_keeps_its_padding_bound():
    layers = _layers(12)
    own = [sum(shared_shapes.nbytes(p) for p in layer) for layer in layers]
    for bound in (0.0, 0.02, 0.1, math.inf):
        plan = shared_shapes.plan_groups(layers, bound)
        assert plan.bytes_unpadded == sum(own)
        for g, target in enumerate(plan.targets):
            members = [i for i, gi in enumerate(plan.group_of) if gi == g]
            padded = sum(shared_shapes.nbytes(p) for p in target) * len(members)
            assert padded <= (1 + bound) * sum(own[i] for i in members) + 1e-9
            for i in members:  # every member fits its target
                for p, t in zip(layers[i], target, strict=False):
                    assert shared_shapes.merged(p, t) == t
    assert shared_shapes.plan_groups(layers, math.inf).num_groups == 1
    # identical layers share even at bound 0
    assert shared_shapes.plan_groups([layers[0], layers[0]], 0.0).num_groups == 1


def test_unlike_statics_never_share():
    layers = _layers(2) + _layers(
        1, tile=64
    )  # another tile size: another kernel whatever the padding
    plan = shared_shapes.plan_groups(layers, math.inf)
    assert plan.num_groups == 2 and plan.group_of[2] != plan.group_of[0]
    with pytest.raises(ValueError, match="cannot share a shape"):
        shared_shapes.merged(layers[0][0], layers[2][0])
    with pytest.raises(ValueError, match="max_padding"):
        shared_shapes.plan_groups(layers, -0.1)


def test_pad_layout_refuses_a_smaller_target():
    packed, _ = projections(0, False)
    big = build_expert_kernels(packed, E, "triton", CODES).gate
    small = dataclasses.replace(
        shared_shapes.abstract(big), words=jax.ShapeDtypeStruct((1, big.tile), np.int32)
    )
    with pytest.raises(ValueError, match="cannot pad an axis"):
        shared_shapes.pad_layout(big, small)
    with pytest.raises(ValueError, match="widths"):
        shared_shapes.pad_layout(big, dataclasses.replace(shared_shapes.abstract(big), widths=(1,)))
    other = shared_shapes.abstract(
        build_expert_kernels(packed, E, "triton", CodeConfig(tile=64)).gate
    )
    with pytest.raises(ValueError, match="other statics"):
        shared_shapes.pad_layout(big, other)


def test_backend_configs_are_read_whole():
    # the counter of kernels to compile reads each config to its closing brace, not to the first one
    line = (
        r"%0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%a) "
        r'{mhlo.backend_config = {grid_x = 2 : i32, ir = "a}\"{b", name = "k"}, x = 1} : (t) -> t'
    )
    assert kernel_configs(line, "triton") == [r'{grid_x = 2 : i32, ir = "a}\"{b", name = "k"}']
    tpu = (
        "%1 = stablehlo.custom_call @tpu_custom_call(%a) "
        '{backend_config = "{\\"custom_call_config\\": 1}", kernel_name = "k"}'
    )
    assert kernel_configs(tpu, "mosaic_tpu") == ['"{\\"custom_call_config\\": 1}"']
    assert kernel_configs(line, "mosaic_tpu") == []
