"""The baselines streamed a chunk of experts at a time give what they give on the whole layer.

References: the whole-layer baseline functions called directly on all experts (`rtn_quantize`,
`gptq_quantize_experts`, `kquant_experts`), and, end to end, the in-memory path (`run_baseline` on
the whole loaded model, the layer's full routing) against the streamed command (`quantize_baseline`:
experts read from the checkpoint's bytes a chunk at a time, next-layer inputs from the chunked
forward).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from bitsmoe_jax.baselines.gptq import gptq_quantize_experts
from bitsmoe_jax.baselines.kquants import kquant_experts, type_for_target
from bitsmoe_jax.baselines.rtn import rtn_quantize
from bitsmoe_jax.baselines.run import baseline_quantizer, local_routing, run_baseline
from bitsmoe_jax.io.checkpoint import META_FILE, load_tree
from bitsmoe_jax.io.data import read_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.method.expert_source import ArraySource
from bitsmoe_jax.run.baseline_driver import quantize_baseline
from bitsmoe_jax.run.config_schema import default_config, run_config
from bitsmoe_jax.run.inputs import calibration_tokens
from bitsmoe_jax.run.outputs import check_output_location
from conversion.synthetic import write_random_mixtral


def _layer(e: int, d: int, f: int, n: int = 384, seed: int = 0):
    rng = np.random.default_rng(seed)
    mats = {
        "gate": rng.normal(size=(e, d, f)).astype(np.float32),
        "up": rng.normal(size=(e, d, f)).astype(np.float32),
        "down": rng.normal(size=(e, f, d)).astype(np.float32),
    }
    x = rng.normal(size=(n, d)).astype(np.float32)
    # expert e - 1 gets no token: the starved fallback must name it by its layer-wide id
    idx = np.stack([rng.choice(e - 1, 2, replace=False) for _ in range(n)]).astype(np.int32)
    w = np.full((n, 2), 0.5, np.float32)
    return mats, x, idx, w


def test_local_routing():
    idx = np.array([[0, 5], [3, 4], [7, 2]])
    np.testing.assert_array_equal(local_routing(idx, 3, 6), [[-1, 2], [0, 1], [-1, -1]])


@pytest.mark.parametrize("chunk", [1, 3, None])
@pytest.mark.parametrize("method", ["rtn_asym", "gptq_asym", "gptq", "kquant"])
def test_chunks_equal_whole_layer(method, chunk):
    e, d, f = (4, 256, 256) if method == "kquant" else (7, 64, 96)
    mats, x, idx, w = _layer(e, d, f)
    config = SimpleNamespace(hidden_size=d, moe_intermediate_size=f)
    q = baseline_quantizer(method, config, 2.5, 128, 16)
    out = {p: np.zeros_like(m) for p, m in mats.items()}
    seen = []
    for e0, e1, got in q.quantize_layer(
        3, ArraySource(**mats), chunk, x, lambda _: (None, w, idx), None
    ):
        seen.append((e0, e1))
        for p in out:
            out[p][e0:e1] = got[p]
    assert seen[-1][1] == e and len(seen) == -(-e // (chunk or e))
    if method.startswith("rtn"):
        s = q.setting
        ref = {p: rtn_quantize(m, s.bits, s.group_size, 1, s.zero_point) for p, m in mats.items()}
    elif method == "kquant":
        ref = kquant_experts(*mats.values(), x, idx, w, type_for_target(2.5))
    else:
        s = q.setting
        ref = gptq_quantize_experts(
            *mats.values(), x, idx, w, s.bits, s.group_size, zero_point=s.zero_point
        )
    for p in out:
        np.testing.assert_array_equal(out[p], np.asarray(ref[p]), err_msg=p)
    if not method.startswith("rtn"):
        assert q.info()["starved_experts"] == {3: [e - 1]} == {3: list(ref["starved"])}


@pytest.mark.parametrize("method", ["gptq_asym", "expertwise"])
def test_streamed_command_equals_in_memory(tmp_path, method):
    """The quantize command (streamed, one expert at a time) writes the experts that the in-memory
    path computes on the loaded model; the report records the same setting and starved experts."""
    model = write_random_mixtral(tmp_path / "m", 2, 64, 128, 8, shard_bytes=1 << 20, std=0.05)
    calib = tmp_path / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:20000])
    c = default_config()
    c.update(
        model_path=str(model),
        output_dir=str(tmp_path / "out"),
        method=method,
        budget_bits=(2.5,),
        eval_text="",
        calib_text=str(calib),
        num_calib_tokens=256,
        seq_len=64,
        expert_chunk=1,
    )
    (report,) = quantize_baseline(run_config(c), progress=False)
    ref_model, config = load_model(model)
    calib_ids = calibration_tokens(str(model), str(calib), 256, 64)
    info = run_baseline(method, ref_model, calib_ids, 2.5, 128, 16)
    assert report["setting"] == info["setting"]
    assert report["starved_experts"] == info.get("starved_experts", {})
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["quantization"]["effective_bpw_experts"] == info["effective_bpw_experts"]
    # a baseline's output is this tool's: the output check lets overwrite=True replace it
    check_output_location(tmp_path / "out", [tmp_path / "out"])
    for i in config.moe_layers:
        written = load_tree(tmp_path / "out" / "params" / f"layer_{i:03d}")["mlp"]["experts"]
        ex = ref_model.layers[i].mlp.experts
        for p in ("gate", "up", "down"):
            np.testing.assert_array_equal(
                np.asarray(written[p]), np.asarray(getattr(ex, p)[...]), err_msg=f"{i} {p}"
            )
