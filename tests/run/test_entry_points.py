"""`bitsmoe_jax.quantize_checkpoint` (Python, no config file) writes what `python -m
bitsmoe_jax.quantize` writes for the same fields: every array file and JSON byte for byte (the
command line is the reference), and returns the reports it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import bitsmoe_jax
from bitsmoe_jax import quantize
from tests.run.tiny_mixtral import SEQ

SKIP = {"timings.json", "_CHECKPOINT_METADATA", "commit_success.txt"}  # run times, orbax stamps


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes().replace(str(root).encode(), b"OUT")
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in SKIP
    }


def test_python_api_writes_what_the_command_line_writes(hf, texts, tmp_path):
    fields = {
        "num_calib_tokens": 512,
        "seq_len": SEQ,
        "group_size": 64,
        "calib_text": str(texts[0]),
        "eval_text": "",
    }
    cli, api = tmp_path / "cli", tmp_path / "api_"  # same path length: the paths are recorded
    argv = ["--config.model_path=" + str(hf[0]), f"--config.output_dir={cli}"]
    argv += ["--config.budget_bits=(2.0,3.0)"] + [f"--config.{k}={v}" for k, v in fields.items()]
    assert (
        quantize.main(["--config", str(Path(__file__).parents[2] / "configs" / "tiny.py"), *argv])
        == 0
    )
    reports = bitsmoe_jax.quantize_checkpoint(hf[0], api, (2.0, 3.0), progress=False, **fields)
    want, got = files(cli), files(api)
    assert sorted(got) == sorted(want) and any(k.endswith("quantized.json") for k in got)
    assert [k for k in want if got[k] != want[k]] == []
    assert [r["budget_bits"] for r in reports] == [2.0, 3.0]
    assert (
        reports[0]["effective_bpw_experts"]
        == json.loads((api / "bpw_2.00" / "report.json").read_text())["effective_bpw_experts"]
    )
