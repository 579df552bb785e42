"""The typed config against the ConfigDict it is built from: every field and value carried over,
the recorded dict identical (key order included, as `quantized.json` writes it), validation on
every way in, and the method's defaults agreeing with the config file's."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from bitsmoe_jax.method.config import MethodConfig
from bitsmoe_jax.parallel.distributed import DistributedConfig
from bitsmoe_jax.run.config_schema import RunConfig, default_config, run_config, with_fields

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = {
    "budget_bits": (2.0, 2.5),
    "mesh_shape": (1,),
    "rank": 64,
    "super_experts": "auto",
    "eval_max_tokens": 100,
    "group_size": 64,
    "calib_text": "milton",
    "distributed.num_processes": 2,
    "distributed.coordinator_address": "host:1234",
}


def config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "deepseek_v2_lite",
        "deepseek_v3",
        "kimi_k2",
        "glm4_moe",
        "gpt_oss",
        "llama4",
        "qwen3_next",
    ],
)
@pytest.mark.parametrize("overrides", [{}, OVERRIDES], ids=["as_shipped", "overridden"])
def test_to_dict_is_the_config_dicts_own(name, overrides):
    c = with_fields(
        config_file(name), {"model_path": "m", "output_dir": "o", "calib_text": "c", **overrides}
    )
    want = c.to_dict()
    got = run_config(c).to_dict()
    assert list(got.items()) == list(want.items())
    assert list(got["distributed"].items()) == list(want["distributed"].items())


def test_fields_land_in_their_typed_places():
    run = run_config(
        with_fields(default_config(), {"model_path": "m", "output_dir": "o", **OVERRIDES})
    )
    assert run.budget_bits == (2.0, 2.5) and run.calib_text == "milton" and run.mesh_shape == (1,)
    assert run.params == MethodConfig(rank=64, super_experts="auto", group_size=64)
    assert run.distributed == DistributedConfig(num_processes=2, coordinator_address="host:1234")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seq_len = 3  # type: ignore[misc]


def test_method_and_distributed_defaults_are_the_config_files():
    c = default_config().to_dict()
    assert dataclasses.asdict(MethodConfig()) == {
        f.name: c[f.name] for f in dataclasses.fields(MethodConfig)
    }
    assert dataclasses.asdict(DistributedConfig()) == c["distributed"]


def test_every_config_field_has_one_typed_home():
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"params"}
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
    assert run_fields.isdisjoint(method_fields)
    assert run_fields | method_fields == set(default_config().keys())


def test_create_and_replace_validate():
    run = RunConfig.create(model_path="m", output_dir="o", budget_bits=(3.0,))
    assert run.budget_bits == (3.0,) and run.params == MethodConfig()
    assert run.replace(group_size=32).params.group_size == 32
    assert run.replace(**{"distributed.heartbeat_timeout": 5}).distributed.heartbeat_timeout == 5
    with pytest.raises(
        ValueError, match=r"config.rounding='best' is invalid; allowed: gptq, nearest"
    ):
        run.replace(rounding="best")
    with pytest.raises(ValueError, match="unknown config field 'group'"):
        run.replace(group=3)
    with pytest.raises(ValueError, match="config.model_path=''"):
        RunConfig.create(output_dir="o")
    with pytest.raises(ValueError, match="config.calib_text=''"):
        RunConfig.create(model_path="m", output_dir="o", calib_text="")
