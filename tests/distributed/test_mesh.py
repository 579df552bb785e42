"""In-process checks of the distributed config, the expert mesh and the order-fixed Gram reduction.

The multi-device and multi-process behaviour is in `test_multihost.py` / `test_failures.py`
(subprocesses); these run on the test process's single CPU device.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bitsmoe_jax.config_cli import apply_overrides
from bitsmoe_jax.method import sharded
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.config_schema import default_config, run_config, validate


def cfg(**overrides):
    c = default_config()
    c.model_path, c.output_dir = "m", "o"
    return apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])


def test_nested_distributed_overrides_and_their_errors():
    c = cfg(
        **{
            "distributed.num_processes": 2,
            "distributed.process_id": 1,
            "distributed.coordinator_address": "10.0.0.1:8476",
        }
    )
    validate(c)
    assert (
        c.distributed.num_processes,
        c.distributed.process_id,
        c.distributed.coordinator_address,
    ) == (2, 1, "10.0.0.1:8476")
    with pytest.raises(
        ValueError,
        match=r"unknown config field 'distributed.port'; "
        r"known fields of config.distributed: auto, ",
    ):
        cfg(**{"distributed.port": 1})
    with pytest.raises(ValueError, match=r"config.distributed.coordinator_address='' is invalid"):
        validate(cfg(**{"distributed.num_processes": 2}))
    with pytest.raises(
        ValueError,
        match=r"config.distributed.process_id=2 is invalid; allowed: an integer in \[0, "
        r"num_processes=2\)",
    ):
        validate(
            cfg(
                **{
                    "distributed.num_processes": 2,
                    "distributed.process_id": 2,
                    "distributed.coordinator_address": "h:1",
                }
            )
        )
    with pytest.raises(ValueError, match=r"config.mesh_shape=\(2, 2\) is invalid"):
        validate(cfg(mesh_shape="(2,2)"))
    with pytest.raises(
        ValueError,
        match=r"config.method='gptq' is invalid; allowed: bitsmoe for a multi-process run",
    ):
        validate(cfg(method="gptq", **{"distributed.auto": True}))


def test_single_process_defaults_touch_nothing():
    c = cfg()
    # a no-op: must not start the coordination service
    distributed.initialize(run_config(c).distributed)
    assert distributed._client() is None
    assert (distributed.process_index(), distributed.process_count(), distributed.is_writer()) == (
        0,
        1,
        True,
    )
    distributed.barrier("no_peers", timeout_s=0.01)  # nothing to wait for


def test_mesh_is_one_auto_expert_axis_over_all_devices():
    mesh = distributed.make_mesh(cfg().mesh_shape)
    assert mesh.axis_names == ("expert",) and mesh.size == len(jax.devices())
    assert "Auto" in str(mesh.axis_types[0])
    assert distributed.make_mesh(cfg(mesh_shape="(1,)").mesh_shape).size == 1
    with pytest.raises(
        distributed.DistributedError, match=r"config.mesh_shape=\(64,\) does not fit the 1 devices"
    ):
        distributed.make_mesh(cfg(mesh_shape="(64,)").mesh_shape)


def test_layout_pads_experts_to_a_power_of_two():
    layout = sharded.expert_layout(sharded.single_device_mesh(), 5)
    assert (layout.padded, layout.per_device, layout.local_experts()) == (8, 8, [0, 1, 2, 3, 4])


def test_gram_sum_matches_float64_reference():
    rng = np.random.default_rng(0)
    layout = sharded.expert_layout(sharded.single_device_mesh(), 5)
    gate = rng.normal(size=(5, 12, 7)).astype(np.float32)  # [E, D, F]
    down = rng.normal(size=(5, 7, 12)).astype(np.float32)  # [E, F, D]
    g64 = np.einsum("edf,ekf->dk", gate.astype(np.float64), gate)
    d64 = np.einsum("efd,efk->dk", down.astype(np.float64), down)
    g = sharded.gram_sum(
        layout,
        sharded.expert_array(layout, lambda e: gate[e], (12, 7), np.float32),
        contract_first=False,
    )
    d = sharded.gram_sum(
        layout,
        sharded.expert_array(layout, lambda e: down[e], (7, 12), np.float32),
        contract_first=True,
    )
    np.testing.assert_allclose(g, g64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, d64, rtol=1e-5, atol=1e-5)


def test_local_sum_is_the_pairwise_tree_not_the_sequential_sum():
    # float32: 1e8 + 1 rounds to 1e8, so the association decides the answer
    v = np.array([1.0, 1.0, 1e8, -1e8, 0.5, 0.5, 1e8, -1e8], np.float32)
    f32 = np.float32
    tree = ((f32(v[0]) + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))
    seq = f32(0)
    for x in v:
        seq = f32(seq + x)
    assert tree != seq  # the case distinguishes the two orders
    got = jax.jit(lambda a: sharded._tree_sum_local(a, lambda m: m))(jax.numpy.asarray(v))
    assert np.float32(got) == tree
