"""The TPU (Mosaic) kernels under the TPU interpreter, against the pure-jnp reference.

`test_kernels` runs them in the generic interpreter, which evaluates the kernel body on whole arrays
and knows nothing of TPU memory. The TPU interpreter (`pltpu.InterpretParams`) simulates it: block
copies into VMEM, uninitialized VMEM scratch and outputs filled with NaN (so a read before the first
write poisons the result), out-of-bounds block reads raising, and the "parallel" grid axes run on
two simulated cores (a megacore chip) with race detection and a check that no output block is
visited by two cores. What it still cannot check, the real tiling rules, `test_lowering` checks by
lowering for ``tpu``.

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

from pallas_kernels.api import swiglu_experts
from pallas_kernels.reference import swiglu_experts_reference
from tests.kernels.test_kernels import inputs, kernels

TPU_INTERPRETER = pltpu.InterpretParams(
    detect_races=True, num_cores_or_threads=2, uninitialized_memory="nan", out_of_bounds_reads="raise"
)


def races_found() -> bool:
    """The TPU interpreter's race flag (module state of JAX's interpreter; 0.10 and 0.11 keep it here)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter

    state = tpu_interpreter.races
    assert state is not None, "the TPU interpreter kept no race-detection state: did detect_races take effect?"
    return bool(state.races_found)


def test_mosaic_kernels_under_the_tpu_interpreter_match_the_reference():
    pltpu.reset_tpu_interpret_mode_state()
    kern, (ag, au, bd) = kernels(False, "mosaic")
    zg, zu = inputs(jnp.float32)
    # empty experts, and one expert with more rows than a row tile (several row tiles, padded ones after)
    sizes = jnp.asarray([1, 0, 2, 0, 3, 0, 18, 0], jnp.int32)
    run = jax.jit(functools.partial(swiglu_experts, backend="mosaic", interpret=TPU_INTERPRETER))
    got = run(zg, zu, sizes, kern)
    want = swiglu_experts_reference(zg, zu, sizes, ag, au, bd)
    scale = float(jnp.max(jnp.abs(want)))
    assert bool(jnp.all(jnp.isfinite(got))), "NaN in the output: a kernel read VMEM before writing it"
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * scale)
    assert not races_found()


def test_interpreter_params_are_refused_by_the_gpu_kernels():
    kern, _ = kernels(False, "triton")
    zg, zu = inputs(jnp.float32)
    with pytest.raises(TypeError, match="interpret must be a bool for the 'triton' kernels"):
        swiglu_experts(zg, zu, jnp.full((8,), 3, jnp.int32), kern, interpret=TPU_INTERPRETER)
