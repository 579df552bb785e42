"""The pre-flight check finds a bad tensor anywhere in a checkpoint before any work, by name.

Each case is a copy of the shipped reference checkpoint (a real trained model) broken with raw byte
edits of its safetensors file (the header JSON or a value's two bytes, written here by hand, not
with the project's writer): a NaN or an Inf in the *last* layer's last expert, a tensor removed
from the header, a shape changed. `python -m bitsmoe_jax.quantize` must exit non-zero with one
line naming the file and the tensor, no traceback, and leave neither the output nor a work
directory behind — for BitsMoE and for a baseline.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bitsmoe_jax import quantize
from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.loading import model_config
from conversion.hf_checkpoint import CheckpointError
from conversion.preflight import preflight

ST = "model.safetensors"
LAST_EXPERT = "model.layers.2.block_sparse_moe.experts.15.w2.weight"  # the last layer's last expert


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def _rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    header, start = _header(path)
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    data = path.read_bytes()[start:]
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def _poke_bf16(path: Path, tensor: str, index: int, bits: int) -> None:
    """Overwrite element `index` (flat) of bf16 tensor `tensor` with the raw 16-bit pattern."""
    header, start = _header(path)
    entry = header[tensor]
    assert entry["dtype"] == "BF16"
    offset = start + entry["data_offsets"][0] + 2 * index
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<H", bits))


@pytest.fixture
def copy(tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(REFERENCE_DIR, d)
    return d


def _drop(name: str) -> Callable[[dict], None]:
    return lambda h: h.pop(name)


def _reshape(name: str, shape: list[int]) -> Callable[[dict], None]:
    def edit(h: dict) -> None:
        h[name]["shape"] = shape

    return edit


BAD = {
    "nan": (lambda d: _poke_bf16(d / ST, LAST_EXPERT, 255 * 256 + 7, 0x7FC0), "NaN or Inf"),
    "inf": (lambda d: _poke_bf16(d / ST, "model.norm.weight", 3, 0x7F80), "NaN or Inf"),
    "missing": (lambda d: _rewrite_header(d / ST, _drop(LAST_EXPERT)), "missing"),
    "shape": (
        lambda d: _rewrite_header(
            d / ST, _reshape("model.layers.2.self_attn.k_proj.weight", [256, 128])
        ),
        "shape (256, 128), expected (128, 256)",
    ),
}
NAMED = {
    "nan": LAST_EXPERT,
    "inf": "model.norm.weight",
    "missing": LAST_EXPERT,
    "shape": "model.layers.2.self_attn.k_proj.weight",
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("method", ["bitsmoe", "rtn"])
def test_quantize_refuses_a_bad_checkpoint_before_any_work(copy, tmp_path, capsys, case, method):
    break_it, phrase = BAD[case]
    break_it(copy)
    out = tmp_path / "out"
    argv = [
        "--config",
        str(Path(__file__).parents[2] / "configs" / "tiny.py"),
        f"--config.model_path={copy}",
        f"--config.output_dir={out}",
        f"--config.method={method}",
        "--config.calib_text=shakespeare_train",
        "--config.eval_text=",
    ]
    assert quantize.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert NAMED[case] in lines[0] and phrase in lines[0], lines[0]
    assert "Traceback" not in err
    if case in ("nan", "inf"):
        assert str(copy / ST) in lines[0]  # the file too
    # nothing written: no output, no work directory, nothing else beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_values_are_read_only_when_asked(copy):
    BAD["nan"][0](copy)
    config = model_config(copy)
    summary = preflight(copy, config, check_values=False)
    assert summary.tensors == 168 and summary.bytes_checked == 0
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        preflight(copy, config, check_values=True)


def test_a_good_checkpoint_passes_and_every_byte_is_read(copy):
    header, _ = _header(copy / ST)
    header.pop("__metadata__", None)
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    summary = preflight(copy, model_config(copy))
    assert summary.tensors == len(header) == 168
    assert summary.bytes_checked == stored


def test_fused_experts_are_checked_in_their_own_layout(copy):
    """The fused layout ([E, 2F, D] gate_up, [E, D, F] down), built here with numpy from the
    per-expert tensors; then one expert's row of the fused tensor is made NaN."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(copy / ST))
    config = model_config(copy)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        e_ids = range(config.num_experts)
        w1 = np.stack([tensors.pop(f"{p}.{e}.w1.weight") for e in e_ids])
        w3 = np.stack([tensors.pop(f"{p}.{e}.w3.weight") for e in e_ids])
        w2 = np.stack([tensors.pop(f"{p}.{e}.w2.weight") for e in e_ids])
        tensors[f"{p}.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
        tensors[f"{p}.down_proj"] = w2
    save_file(tensors, str(copy / ST))
    assert preflight(copy, config).tensors == 3 + 3 * (7 + 2)
    fused = "model.layers.1.block_sparse_moe.experts.down_proj"
    _poke_bf16(copy / ST, fused, 9 * 256 * 256 + 5, 0x7FC0)
    with pytest.raises(CheckpointError, match=f"tensor '{fused}' contains NaN"):
        preflight(copy, config)
    _rewrite_header(copy / ST, _reshape(fused, [16, 256, 128, 2]))
    with pytest.raises(
        CheckpointError, match=r"shape \(16, 256, 128, 2\), expected \(16, 256, 256\)"
    ):
        preflight(copy, config, check_values=False)


def test_an_extra_tensor_is_refused(copy):
    def add(h: dict) -> None:
        h["model.layers.1.mlp.extra_bias"] = dict(h["model.norm.weight"])

    _rewrite_header(copy / ST, add)
    with pytest.raises(CheckpointError, match="not used by the model: 'model.layers.1.mlp.extra"):
        preflight(copy, model_config(copy), check_values=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_all_finite_agrees_with_isfinite(dtype):
    """The exponent-bit test against numpy's isfinite on a float32/float64 copy, on random bit
    patterns (every NaN payload, both infinities, subnormals, extremes)."""
    import ml_dtypes

    from conversion.hf_checkpoint import all_finite

    dt = np.dtype(getattr(ml_dtypes, dtype, None) or getattr(np, dtype))
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, np.iinfo(bits).max, size=4000, dtype=bits, endpoint=True)
    values = patterns.view(dt)
    wide = np.float64 if dt.itemsize == 8 else np.float32
    for chunk in np.array_split(values, 400):  # most chunks of 10 random patterns are finite
        assert all_finite(chunk) == bool(np.isfinite(chunk.astype(wide)).all())
    assert all_finite(np.arange(4)) and all_finite(np.zeros((0,), dt))
