"""An evaluation that cannot fit is refused before any work, not hours later after the last layer.

The evaluation after writing loads the whole unquantized model in float32 and the quantized model
on process 0. `evaluation_bytes` is checked against the shipped checkpoint's own tensor shapes
(read from its safetensors headers, not from the model the package builds), and a run whose host
memory is smaller than that stops with one message naming `eval_text` before it writes anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from bitsmoe_jax import quantize
from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.loading import model_config
from bitsmoe_jax.run.preflight import evaluation_bytes
from conversion.hf_checkpoint import HFCheckpoint

ROOT = Path(__file__).resolve().parents[2]


def test_evaluation_bytes_count_the_checkpoints_tensors():
    ckpt = HFCheckpoint(REFERENCE_DIR)
    sizes = {name: math.prod(ckpt.shape(name)) for name in ckpt.keys()}
    total = sum(sizes.values())
    routed = sum(n for name, n in sizes.items() if ".block_sparse_moe.experts." in name)
    assert 0 < routed < total
    ref, quant = evaluation_bytes(model_config(REFERENCE_DIR), 2.5)
    assert ref == 4 * total
    assert quant == 4 * (total - routed) + routed * 2.5 / 8


def test_an_evaluation_larger_than_the_host_memory_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    config = model_config(REFERENCE_DIR)
    ref, _ = evaluation_bytes(config, 2.0)
    host_gb = ref / 2 / (1 << 30)  # half of the reference model alone
    argv = [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.output_dir={out}",
        "--config.budget_bits=2.0",
        f"--config.host_memory_gb={host_gb}",
        f"--config.work_dir={tmp_path / 'work'}",
    ]
    assert quantize.main(argv) == 2
    err = capsys.readouterr().err
    assert "eval_text='shakespeare_test'" in err and "--config.eval_text=" in err, err
    assert f"float32 ({ref / (1 << 30):.1f} GiB)" in err, err
    assert "host_memory_gb" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no work directory
