"""Every supported on-disk layout of the same model converts to the same logits, equal to HF's.

Layouts: per-expert safetensors (what `save_pretrained` writes), fused 3-D expert tensors
(transformers 5's in-memory `state_dict`, under `mlp.` and, for Mixtral, `block_sparse_moe.`),
several safetensors shards behind an index, PyTorch `.bin` (single, and sharded behind
`pytorch_model.bin.index.json`), and bf16 / fp16 sources. Plus the CLI (`python -m conversion`) and
a check that conversion streams one layer at a time.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import PARITY_TOL, flax_logits, hf_logits, max_abs_diff, random_ids

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from bitsmoe_jax.io.checkpoint import META_FILE, load_tree  # noqa: E402
from bitsmoe_jax.loading import load_model  # noqa: E402
from conversion.__main__ import main as convert_main  # noqa: E402
from conversion.hf_checkpoint import HFCheckpoint, SafetensorsFile  # noqa: E402

LAYOUT_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
IDS = random_ids(2, 64, seed=2)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------ helpers
def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _flax_logits_from(path: Path) -> np.ndarray:
    model, _ = load_model(path)
    return flax_logits(model, IDS)


def _file_keys(d: Path) -> list[str]:
    keys: list[str] = []
    for f in sorted(d.glob("*.safetensors")):
        keys += SafetensorsFile(f).keys()
    return keys


def _rounded_copy(hf, tdt) -> torch.nn.Module:
    """An fp32 copy of `hf` whose parameters are rounded to `tdt` (buffers such as RoPE inv_freq
    untouched)."""
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(tdt).to(torch.float32))
    return model.eval()


def _fused_state_dict(hf) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().clone() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd), (
        "transformers 5 holds experts fused"
    )
    return sd


@pytest.fixture(scope="module", params=LAYOUT_FAMILIES)
def fam(request, tiny_family):
    hf_dir, hf = tiny_family(request.param)
    base = _flax_logits_from(hf_dir)
    ref = hf_logits(hf, IDS)
    d = max_abs_diff(base, ref)
    assert d <= PARITY_TOL, f"{request.param}: per-expert safetensors vs HF max diff {d:.3e}"
    return dict(family=request.param, hf_dir=hf_dir, hf=hf, base=base, ref=ref)


def _assert_same(fam: dict, got: np.ndarray, what: str) -> None:
    """fp32 sources hold identical weights whatever the layout: logits must be bitwise equal."""
    d_hf = max_abs_diff(got, fam["ref"])
    assert d_hf <= PARITY_TOL, f"{fam['family']} {what}: max |logit diff| vs HF {d_hf:.3e}"
    assert np.array_equal(got, fam["base"]), (
        f"{fam['family']} {what}: differs from the per-expert checkpoint by "
        f"{max_abs_diff(got, fam['base']):.3e}"
    )


# ------------------------------------------------------------------------------------------ layouts
def test_per_expert_layout_is_what_save_pretrained_writes(fam):
    keys = _file_keys(fam["hf_dir"])
    moe = "block_sparse_moe" if fam["family"] == "mixtral" else "mlp"
    name = "w1" if fam["family"] == "mixtral" else "gate_proj"
    assert any(re.search(rf"\.{moe}\.experts\.7\.{name}\.weight$", k) for k in keys), keys[:20]
    assert not any(k.endswith("gate_up_proj") for k in keys)


def test_fused_layout(fam, tmp_path):
    sd = _fused_state_dict(fam["hf"])
    prefixes = {"mlp": sd}
    if fam["family"] == "mixtral":
        prefixes["block_sparse_moe"] = {
            k.replace(".mlp.", ".block_sparse_moe."): v for k, v in sd.items()
        }
    for prefix, tensors in prefixes.items():
        d = _copy_config(fam["hf_dir"], tmp_path / prefix)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        assert any(k.endswith(f"{prefix}.experts.gate_up_proj") for k in _file_keys(d))
        _assert_same(fam, _flax_logits_from(d), f"fused layout under {prefix}.")


def test_sharded_safetensors(fam, tmp_path):
    d = tmp_path / "sharded"
    fam["hf"].save_pretrained(d, max_shard_size="150KB")
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) >= 2, shards
    assert (d / "model.safetensors.index.json").is_file()
    # shards really split the decoder layers between files
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == len(shards)
    _assert_same(fam, _flax_logits_from(d), f"{len(shards)} safetensors shards")


def test_single_bin_fused(fam, tmp_path):
    d = _copy_config(fam["hf_dir"], tmp_path / "bin")
    torch.save(_fused_state_dict(fam["hf"]), d / "pytorch_model.bin")
    _assert_same(fam, _flax_logits_from(d), "pytorch_model.bin (fused experts)")


def test_sharded_bin_per_expert(fam, tmp_path):
    """Per-expert keys (as old .bin checkpoints have them) in 3 .bin shards behind an index."""
    d = _copy_config(fam["hf_dir"], tmp_path / "binshards")
    per_expert = load_file(str(fam["hf_dir"] / "model.safetensors"))

    def shard_of(k: str) -> int:
        m = _LAYER.match(k)
        return 0 if m is None else 1 + int(m.group(1)) % 2

    n = 3
    names = [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]
    weight_map = {k: names[shard_of(k)] for k in per_expert}
    for i, name in enumerate(names):
        torch.save({k: v for k, v in per_expert.items() if shard_of(k) == i}, d / name)
    total = sum(v.numel() * v.element_size() for v in per_expert.values())
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    _assert_same(fam, _flax_logits_from(d), "3 sharded .bin files (per-expert keys)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_sources(fam, tmp_path, dtype):
    """A bf16 / fp16 checkpoint loads (in fp32) to HF's fp32 logits on the same rounded weights."""
    tdt = getattr(torch, dtype)
    half = copy.deepcopy(fam["hf"]).to(tdt)
    d = tmp_path / dtype
    half.save_pretrained(d)
    stored = {e[0] for e in SafetensorsFile(d / "model.safetensors").entries.values()}
    assert stored == {
        np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    }, stored
    ref = hf_logits(_rounded_copy(fam["hf"], tdt), IDS)
    got = _flax_logits_from(d)
    diff = max_abs_diff(got, ref)
    assert diff <= PARITY_TOL, (
        f"{fam['family']} {dtype} source: max |logit diff| vs HF fp32 on rounded weights {diff:.3e}"
    )
    # the rounding is visible, so the test distinguishes a reference on the original fp32 weights
    assert max_abs_diff(fam["ref"], ref) > 10 * PARITY_TOL


# ------------------------------------------------------------------------------------------ CLI
def _tree_dtypes(tree) -> set:
    out = set()
    for v in tree.values():
        out |= _tree_dtypes(v) if isinstance(v, dict) else {np.asarray(v).dtype}
    return out


def test_cli_float32_matches_loading_hf_dir(tiny_family, tmp_path, capsys):
    hf_dir, hf = tiny_family("qwen2_moe")
    out = tmp_path / "converted"
    assert convert_main([str(hf_dir), str(out), "--dtype", "float32"]) == 0
    assert (out / META_FILE).is_file() and (out / "config.json").is_file()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dtype"] == "float32" and meta["config"]["model_type"] == "qwen2_moe"
    assert _tree_dtypes(load_tree(out / "params" / "layer_001")) == {np.dtype(np.float32)}
    assert sorted(p.name for p in (out / "params").iterdir()) == [
        "layer_000",
        "layer_001",
        "layer_002",
        "top",
    ]
    from_out, cfg_out = load_model(out)
    from_hf, cfg_hf = load_model(hf_dir)
    assert cfg_out == cfg_hf
    a, b = flax_logits(from_out, IDS), flax_logits(from_hf, IDS)
    assert np.array_equal(a, b), f"converted vs HF dir: max diff {max_abs_diff(a, b):.3e}"
    assert max_abs_diff(a, hf_logits(hf, IDS)) <= PARITY_TOL
    # nothing but the output directory was created beside it
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]


def test_cli_bfloat16(tiny_family, tmp_path):
    hf_dir, hf = tiny_family("mixtral")
    out = tmp_path / "bf16"
    assert convert_main([str(hf_dir), str(out), "--dtype", "bfloat16"]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dtype"] == "bfloat16"
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert _tree_dtypes(load_tree(out / "params" / "top")) == {bf16}
    for i in range(2):
        assert _tree_dtypes(load_tree(out / "params" / f"layer_{i:03d}")) == {bf16}
    # bf16 weights computed in fp32 == HF fp32 on the same bf16-rounded weights
    model, _ = load_model(out)
    d = max_abs_diff(flax_logits(model, IDS), hf_logits(_rounded_copy(hf, torch.bfloat16), IDS))
    assert d <= PARITY_TOL, f"bf16 conversion vs HF on rounded weights: {d:.3e}"


def test_cli_default_dtype_is_bfloat16(tiny_family, tmp_path):
    hf_dir, _ = tiny_family("qwen3_moe")
    out = tmp_path / "default"
    assert convert_main([str(hf_dir), str(out)]) == 0
    assert json.loads((out / META_FILE).read_text())["dtype"] == "bfloat16"
    assert _tree_dtypes(load_tree(out / "params" / "layer_000")) == {np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------------------------------
# streaming
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_conversion_streams_one_layer_at_a_time(tiny_family, tmp_path, monkeypatch, family):
    """Reads are grouped by part (top, layer 0, 1, ...), each part is written before the next is
    read,
    `release()` runs between layers, and every tensor of the checkpoint is read exactly once."""
    import conversion.convert as convert_mod

    hf_dir, hf = tiny_family(family)
    events: list[tuple[str, object]] = []
    orig_get, orig_release, orig_save = (
        HFCheckpoint.get,
        HFCheckpoint.release,
        convert_mod.save_tree,
    )

    def get(self, name, *a, **k):
        m = _LAYER.match(name)
        events.append(("read", "top" if m is None else int(m.group(1)), name))
        return orig_get(self, name, *a, **k)

    def release(self):
        events.append(("release",))
        return orig_release(self)

    def save_tree(path, tree):
        name = Path(path).name
        events.append(("save", "top" if name == "top" else int(name.split("_")[1])))
        return orig_save(path, tree)

    monkeypatch.setattr(HFCheckpoint, "get", get)
    monkeypatch.setattr(HFCheckpoint, "release", release)
    monkeypatch.setattr(convert_mod, "save_tree", save_tree)
    assert convert_main([str(hf_dir), str(tmp_path / "out"), "--dtype", "float32"]) == 0

    n_layers = hf.config.num_hidden_layers
    parts = ["top"] + list(range(n_layers))
    # Split the event log at each save: the reads before save k are exactly part k's tensors.
    pos = 0
    for k, part in enumerate(parts):
        reads = []
        while events[pos][0] != "save":
            if events[pos][0] == "read":
                reads.append(events[pos][1])
            elif k >= 1:
                pytest.fail(f"release() in the middle of reading part {part}")
            pos += 1
        assert events[pos] == ("save", part), f"expected save of {part}, got {events[pos]}"
        assert reads and set(reads) == {part}, (
            f"part {part}: read tensors of parts {sorted(set(map(str, reads)))}"
        )
        pos += 1
        if isinstance(part, int):
            assert events[pos] == ("release",), f"no release() after layer {part}: {events[pos]}"
            pos += 1
    assert pos == len(events), events[pos:]
    read_names = [e[2] for e in events if e[0] == "read"]
    assert len(read_names) == len(set(read_names)), "a tensor was read twice"
    all_keys = set(_file_keys(hf_dir))
    assert set(read_names) == all_keys, (
        f"tensors never read: {sorted(all_keys - set(read_names))[:5]}"
    )


# ------------------------------------------------------------------------------------------ expert
# subsets
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_expert_subset_reads_only_those_experts(fam, tmp_path, monkeypatch, layout):
    """A multi-process run's reader: only the owned experts' tensors (per-expert files) or rows
    (fused
    files) are read from disk; their values are the full read's, every other expert's are zeros."""
    from conversion.convert import iter_parts

    d = fam["hf_dir"]
    if layout == "fused":
        d = _copy_config(fam["hf_dir"], tmp_path / "fused")
        save_file(
            _fused_state_dict(fam["hf"]), str(d / "model.safetensors"), metadata={"format": "pt"}
        )
    full = dict(iter_parts(d))
    reads: list[tuple[str, int | None, int | None]] = []
    get, get_rows = HFCheckpoint.get, HFCheckpoint.get_rows
    monkeypatch.setattr(
        HFCheckpoint,
        "get",
        lambda self, name, *a, **k: (reads.append((name, None, None)), get(self, name, *a, **k))[1],
    )
    monkeypatch.setattr(
        HFCheckpoint,
        "get_rows",
        lambda self, name, s, e, *a, **k: (
            reads.append((name, s, e)),
            get_rows(self, name, s, e, *a, **k),
        )[1],
    )
    owned = [1, 2, 5]
    sub = dict(iter_parts(d, experts=owned))

    expert_reads = [r for r in reads if ".experts." in r[0]]
    assert expert_reads, "no expert tensor was read"
    for name, start, stop in expert_reads:
        if layout == "fused":
            assert (start, stop) in {(1, 3), (5, 6)}, (
                f"{name} read whole or outside the owned rows: {(start, stop)}"
            )
        else:
            e = int(re.search(r"\.experts\.(\d+)\.", name).group(1))
            assert e in owned and start is None, (
                f"{name} read by a process that does not own expert {e}"
            )
    moe_layers = [i for i in range(len(full) - 1) if "experts" in full[i]["mlp"]]
    assert moe_layers
    for i in moe_layers:
        for which, a in full[i]["mlp"]["experts"].items():
            b = sub[i]["mlp"]["experts"][which]
            assert b.shape == a.shape and b.dtype == a.dtype
            np.testing.assert_array_equal(b[owned], a[owned], err_msg=f"layer {i} {which}")
            others = [e for e in range(a.shape[0]) if e not in owned]
            assert not b[others].any(), f"layer {i} {which}: unowned experts are not zero"
        np.testing.assert_array_equal(
            sub[i]["mlp"]["router"]["kernel"], full[i]["mlp"]["router"]["kernel"]
        )
