"""The TPU (Mosaic) kernels under the TPU interpreter, against the pure-jnp reference.

`test_backends` runs them in the generic interpreter, which evaluates the kernel body on whole
arrays
and knows nothing of TPU memory. The TPU interpreter (`pltpu.InterpretParams`) simulates it: block
copies into VMEM, uninitialized VMEM scratch and outputs filled with NaN (so a read before the first
write poisons the result), out-of-bounds block reads raising, and the "parallel" grid axes run on
two simulated cores (a megacore chip) with race detection and a check that no output block is
visited by two cores. It runs once at the small test tiles and once at the real TPU tile sizes. The
tiling rules themselves (block shapes a TPU accepts) `test_lowering` checks by lowering for ``tpu``.

Checked by mutation while writing this test: marking the down kernel's reduction axis "parallel"
makes the interpreter raise ("Revisited block … of output 0").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from bitsmoe_jax.method.packing import dequantize_packed, pack_segments
from pallas_kernels.api import DEFAULT_TILES, build_expert_kernels, swiglu_experts
from tests.kernels.conftest import assert_matches_reference, inputs, kernels

TPU_INTERPRETER = pltpu.InterpretParams(
    detect_races=True,
    num_cores_or_threads=2,
    uninitialized_memory="nan",
    out_of_bounds_reads="raise",
)


def races_found() -> bool:
    """The TPU interpreter's race flag (module state of JAX's interpreter; 0.10 and 0.11 keep it
    here)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

    state = tpu_interpreter.races
    assert state is not None, (
        "the TPU interpreter kept no race-detection state: did detect_races take effect?"
    )
    return bool(state.races_found)


def check_under_the_tpu_interpreter(kern, dense, zg, zu, sizes, rtol: float = 1e-4) -> None:
    """Run the Mosaic kernels under `TPU_INTERPRETER`: finite, the reference's result, no races."""
    pltpu.reset_tpu_interpret_mode_state()
    got = jax.jit(
        functools.partial(swiglu_experts, backend="mosaic_tpu", interpret=TPU_INTERPRETER)
    )(zg, zu, sizes, kern)
    assert bool(jnp.all(jnp.isfinite(got))), (
        "NaN in the output: a kernel read VMEM before writing it"
    )
    assert_matches_reference(got, zg, zu, sizes, dense, rtol)
    assert not races_found()


def test_mosaic_kernels_under_the_tpu_interpreter_match_the_reference():
    kern, dense = kernels(False, "mosaic_tpu")
    # empty experts, and one expert with more rows than a row tile (several row tiles, padded ones
    # after)
    check_under_the_tpu_interpreter(
        kern, dense, *inputs(jnp.float32), jnp.asarray([1, 0, 2, 0, 3, 0, 18, 0], jnp.int32)
    )


@functools.cache
def real_tile_layer():
    """A small layer at the TPU kernels' real tile sizes (`DEFAULT_TILES`: 256-row gate/up tiles,
    128-lane down tiles, 1024-wide blocks here) and the quantizer's group size 128: 4 experts, rank
    512, F = 1024, every bit-width of {0, 1, 2, 3, 4, 8} mixed within each expert."""
    e, r, f, gs = 4, 512, 1024, 128
    rng = np.random.default_rng(0)
    packed, dense = {}, {}
    for p in ("gate", "up", "down"):
        units = rng.standard_normal((e * r, f)).astype(np.float32)
        packed[p] = pack_segments(units, rng.choice([0, 1, 2, 3, 4, 8], size=e * r), gs)
        dense[p] = np.asarray(dequantize_packed(packed[p])).reshape(e, r, f)
    kern = jax.tree.map(
        jnp.asarray, build_expert_kernels(packed, e, "mosaic_tpu", DEFAULT_TILES["mosaic_tpu"])
    )
    return kern, tuple(dense[p] for p in ("gate", "up", "down"))


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_mosaic_kernels_at_the_real_tpu_tiles_under_the_tpu_interpreter(dtype, rtol):
    # the other tests use small tiles (the generic interpreter does not need TPU tiling); these are
    # the block shapes and index maps a TPU runs
    kern, dense = real_tile_layer()
    assert (kern.gate.tile, kern.down.tile, kern.gate.block, kern.down.block) == (
        256,
        128,
        1024,
        1024,
    )
    rng = np.random.default_rng(1)
    zg, zu = (jnp.asarray(rng.standard_normal((16, 512)), dtype) for _ in range(2))
    check_under_the_tpu_interpreter(
        kern, dense, zg, zu, jnp.asarray([0, 11, 5, 0], jnp.int32), rtol
    )


def test_interpreter_params_are_refused_by_the_gpu_kernels():
    kern, _ = kernels(False, "triton")
    zg, zu = inputs(jnp.float32)
    with pytest.raises(TypeError, match="interpret must be a bool for the 'triton' kernels"):
        swiglu_experts(zg, zu, jnp.full((8,), 3, jnp.int32), kern, interpret=TPU_INTERPRETER)
