"""Bad checkpoints give one clear error naming the file / tensor / field, and leave no output
behind.

Each case copies a good tiny Qwen2-MoE checkpoint (saved by transformers), breaks one thing, and
checks both entry points: `load_model(HF_DIR)` raises `CheckpointError` / `ConfigError` whose
message names what is wrong, and `python -m conversion HF_DIR OUT_DIR` (in-process `main([...])`)
returns non-zero, prints that message once, and leaves neither OUT_DIR nor a temporary directory
beside it.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from bitsmoe_jax.io.checkpoint import META_FILE  # noqa: E402
from bitsmoe_jax.loading import load_model  # noqa: E402
from bitsmoe_jax.models.config import ConfigError  # noqa: E402
from conversion.__main__ import main as convert_main  # noqa: E402
from conversion.hf_checkpoint import CheckpointError  # noqa: E402

FAMILY = "qwen2_moe"  # layers: 0 dense, 1-2 MoE with shared expert, qkv biases
ST = "model.safetensors"


# ------------------------------------------------------------------------------------------
# mutations
def _edit_tensors(d: Path, edit: Callable[[dict], None], name: str = ST) -> None:
    tensors = load_file(str(d / name))
    edit(tensors)
    save_file(tensors, str(d / name), metadata={"format": "pt"})


def _edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def _edit_config(d: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _set_value(key: str, index: tuple, value: float, dtype=None) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        v = t[key].clone() if dtype is None else t[key].to(dtype)
        v[index] = value
        t[key] = v

    return edit


def _delete(key: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        del t[key]

    return edit


def _replace(key: str, shape: tuple) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = torch.zeros(shape)

    return edit


def _fused(d: Path, hf) -> None:
    """Rewrite the checkpoint in transformers 5's fused expert layout (then break it)."""
    (d / ST).unlink()
    sd = {k: v.detach().contiguous().clone() for k, v in hf.state_dict().items()}
    sd["model.layers.2.mlp.experts.gate_up_proj"] = torch.zeros(7, 64, 64)
    save_file(sd, str(d / ST), metadata={"format": "pt"})


def _truncate(nbytes_kept: Callable[[int], int]) -> Callable[[Path, object], None]:
    def mutate(d: Path, hf) -> None:
        raw = (d / ST).read_bytes()
        (d / ST).write_bytes(raw[: nbytes_kept(len(raw))])

    return mutate


def _garble_header(junk: bytes) -> Callable[[Path, object], None]:
    def mutate(d: Path, hf) -> None:
        raw = bytearray((d / ST).read_bytes())
        raw[8 : 8 + len(junk)] = junk
        (d / ST).write_bytes(bytes(raw))

    return mutate


def _sharded(d: Path, hf) -> None:
    (d / ST).unlink()
    hf.save_pretrained(d, max_shard_size="150KB")
    assert len(list(d.glob("*.safetensors"))) >= 3


def _missing_shard(d: Path, hf) -> None:
    _sharded(d, hf)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = index["model.layers.2.mlp.gate.weight"]
    (d / victim).unlink()


def _index_points_to_wrong_shard(d: Path, hf) -> None:
    _sharded(d, hf)
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    wm = index["weight_map"]
    key = "model.layers.2.mlp.gate.weight"
    wm[key] = next(f for f in sorted(set(wm.values())) if f != wm[key])
    p.write_text(json.dumps(index))


def _truncated_bin(d: Path, hf) -> None:
    (d / ST).unlink()
    torch.save({k: v.contiguous() for k, v in hf.state_dict().items()}, d / "pytorch_model.bin")
    raw = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])


E_KEY = "model.layers.1.mlp.experts.3.up_proj.weight"


# name -> (mutation(dir, hf_model), exception class, substrings the message must contain)
def _add_unused(key: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = torch.zeros(4)

    return edit


CASES: dict[str, tuple[Callable, type, list[str]]] = {
    "unused_tensor": (  # e.g. an o_proj bias the config does not announce: never silently dropped
        lambda d, hf: _edit_tensors(d, _add_unused("model.layers.1.self_attn.o_proj.bias")),
        CheckpointError,
        ["model.layers.1.self_attn.o_proj.bias", "not used"],
    ),
    "missing_expert_tensor": (
        lambda d, hf: _edit_tensors(d, _delete(E_KEY)),
        CheckpointError,
        [E_KEY, "missing"],
    ),
    "missing_attention_bias": (
        lambda d, hf: _edit_tensors(d, _delete("model.layers.2.self_attn.q_proj.bias")),
        CheckpointError,
        ["model.layers.2.self_attn.q_proj.bias", "missing"],
    ),
    "missing_shared_expert_gate": (
        lambda d, hf: _edit_tensors(d, _delete("model.layers.1.mlp.shared_expert_gate.weight")),
        CheckpointError,
        ["model.layers.1.mlp.shared_expert_gate.weight", "missing"],
    ),
    "missing_lm_head": (
        lambda d, hf: _edit_tensors(d, _delete("lm_head.weight")),
        CheckpointError,
        ["lm_head.weight", "missing"],
    ),
    "wrong_shape_attention": (
        lambda d, hf: _edit_tensors(
            d, _replace("model.layers.1.self_attn.k_proj.weight", (48, 64))
        ),
        CheckpointError,
        ["model.layers.1.self_attn.k_proj.weight", ST, "shape", "48"],
    ),
    "wrong_shape_one_expert": (
        lambda d, hf: _edit_tensors(
            d, _replace("model.layers.2.mlp.experts.5.down_proj.weight", (64, 40))
        ),
        CheckpointError,
        ["model.layers.2.mlp.experts.5.down_proj.weight", "shape", "40"],
    ),
    "wrong_shape_all_routers": (
        lambda d, hf: _edit_tensors(d, _replace("model.layers.1.mlp.gate.weight", (6, 64))),
        CheckpointError,
        ["model.layers.1.mlp.gate.weight", "shape"],
    ),
    "wrong_shape_fused_experts": (
        _fused,
        CheckpointError,
        ["model.layers.2.mlp.experts.gate_up_proj", "(7, 64, 64)"],
    ),
    "nan": (
        lambda d, hf: _edit_tensors(
            d, _set_value("model.layers.2.mlp.shared_expert.up_proj.weight", (3, 5), float("nan"))
        ),
        CheckpointError,
        ["model.layers.2.mlp.shared_expert.up_proj.weight", ST, "NaN"],
    ),
    "inf": (
        lambda d, hf: _edit_tensors(d, _set_value("model.norm.weight", (3,), float("inf"))),
        CheckpointError,
        ["model.norm.weight", ST, "Inf"],
    ),
    "inf_in_bf16_expert": (
        lambda d, hf: _edit_tensors(d, _set_value(E_KEY, (1, 2), float("-inf"), torch.bfloat16)),
        CheckpointError,
        [E_KEY, ST, "Inf"],
    ),
    "truncated_data": (_truncate(lambda n: n - 100), CheckpointError, [ST, "truncated"]),
    "truncated_header": (_truncate(lambda n: 200), CheckpointError, [ST, "truncated"]),
    "truncated_to_nothing": (_truncate(lambda n: 5), CheckpointError, [ST, "truncated"]),
    "corrupt_header_bytes": (_garble_header(b"\xff" * 32), CheckpointError, [ST, "corrupt"]),
    "corrupt_header_json": (_garble_header(b"{" * 32), CheckpointError, [ST, "corrupt"]),
    "corrupt_header_length": (
        lambda d, hf: (d / ST).write_bytes(struct.pack("<Q", 2**40) + (d / ST).read_bytes()[8:]),
        CheckpointError,
        [ST, "header"],
    ),
    "corrupt_header_entry": (
        lambda d, hf: _edit_header(
            d / ST, lambda h: h["model.layers.1.mlp.gate.weight"].pop("data_offsets")
        ),
        CheckpointError,
        [ST, "model.layers.1.mlp.gate.weight"],
    ),
    "missing_shard": (_missing_shard, CheckpointError, ["model-0000", ".safetensors", "missing"]),
    "index_names_wrong_shard": (
        _index_points_to_wrong_shard,
        CheckpointError,
        ["model.layers.2.mlp.gate.weight", "model-0000"],
    ),
    "truncated_bin": (_truncated_bin, CheckpointError, ["pytorch_model.bin"]),
    "no_weight_files": (
        lambda d, hf: (d / ST).unlink(),
        CheckpointError,
        ["no *.safetensors or *.bin"],
    ),
    "unknown_model_type": (
        lambda d, hf: _edit_config(d, lambda c: c.update(model_type="llama")),
        ConfigError,
        ["config.json", "model_type", "llama"],
    ),
    "missing_hidden_size": (
        lambda d, hf: _edit_config(d, lambda c: c.pop("hidden_size")),
        ConfigError,
        ["config.json", "hidden_size"],
    ),
    "missing_num_experts_per_tok": (
        lambda d, hf: _edit_config(d, lambda c: c.pop("num_experts_per_tok")),
        ConfigError,
        ["config.json", "num_experts_per_tok"],
    ),
    "missing_moe_intermediate_size": (
        lambda d, hf: _edit_config(d, lambda c: c.pop("moe_intermediate_size")),
        ConfigError,
        ["config.json", "moe_intermediate_size"],
    ),
    "invalid_config_json": (
        lambda d, hf: (d / "config.json").write_text("{"),
        ConfigError,
        ["config.json", "JSON"],
    ),
    "unsupported_per_layer_sliding_window": (
        lambda d, hf: _edit_config(
            d, lambda c: c.update(use_sliding_window=True, sliding_window=16)
        ),
        ConfigError,
        ["config.json", "use_sliding_window"],
    ),
}


@pytest.fixture()
def good_dir(tiny_family, tmp_path):
    src, hf = tiny_family(FAMILY)
    d = tmp_path / "hf"
    shutil.copytree(src, d)
    return d, hf


def _assert_message(msg: str, needles: list[str]) -> None:
    for s in needles:
        assert s in msg, f"error message lacks {s!r}: {msg}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, good_dir, tmp_path, capsys):
    mutate, exc, needles = CASES[case]
    d, hf = good_dir
    mutate(d, hf)

    # Library entry point: one exception of the documented type, naming the culprit.
    with pytest.raises(exc) as info:
        load_model(d)
    _assert_message(str(info.value), needles)

    # CLI: non-zero exit, the same message printed once, no output and no temp directory left.
    parent = tmp_path / "outputs"
    out = parent / "converted"
    capsys.readouterr()
    rc = convert_main([str(d), str(out), "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("error:") == 1, err
    _assert_message(err, needles)
    assert not out.exists()
    leftovers = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


def test_missing_config_json(good_dir, tmp_path, capsys):
    d, _ = good_dir
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(d)
    out = tmp_path / "outputs" / "converted"
    assert convert_main([str(d), str(out)]) != 0
    assert "config.json" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("empty", ["empty_dir", "no_such_dir"])
def test_load_model_on_empty_directory(tmp_path, empty):
    p = tmp_path / empty
    if empty == "empty_dir":
        p.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_model(p)
    msg = str(info.value)
    assert str(p) in msg and "config.json" in msg and "not a model directory" in msg


def test_failure_mid_write_leaves_nothing(good_dir, tmp_path, monkeypatch):
    """An unexpected exception while writing layer 1 removes the partial output (atomic
    directory)."""
    import conversion.convert as convert_mod

    d, _ = good_dir
    orig = convert_mod.save_tree

    def failing_save(path, tree):
        if Path(path).name == "layer_001":
            raise RuntimeError("disk full")
        return orig(path, tree)

    monkeypatch.setattr(convert_mod, "save_tree", failing_save)
    parent = tmp_path / "outputs"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_main([str(d), str(parent / "converted"), "--dtype", "float32"])
    assert sorted(p.name for p in parent.iterdir()) == []


def test_existing_output_is_kept(good_dir, tmp_path, capsys):
    """Without --overwrite an existing OUT_DIR is refused; with it, a failing run keeps the old
    output."""
    d, _ = good_dir
    parent = tmp_path / "outputs"
    out = parent / "converted"
    assert convert_main([str(d), str(out), "--dtype", "float32"]) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    meta = (out / META_FILE).read_text()

    capsys.readouterr()
    assert convert_main([str(d), str(out), "--dtype", "float32"]) != 0
    assert "already exists" in capsys.readouterr().err

    _edit_tensors(d, _delete(E_KEY))
    assert convert_main([str(d), str(out), "--dtype", "float32", "--overwrite"]) != 0
    assert E_KEY in capsys.readouterr().err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / META_FILE).read_text() == meta
    assert sorted(p.name for p in parent.iterdir()) == ["converted"]
    load_model(out)  # still a complete, loadable checkpoint
