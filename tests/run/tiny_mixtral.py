"""The tiny Hugging Face Mixtral of the end-to-end quantization tests: its sizes, the command
line that quantizes it, and how a report is read back (shared by test_pipeline and test_compare)."""

from __future__ import annotations

import json
from pathlib import Path

from bitsmoe_jax.io.data import REFERENCE_DIR

REF_TOKENIZER = REFERENCE_DIR
ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(ROOT / "configs" / "tiny.py")
E, D, F, LAYERS, VOCAB = 8, 128, 128, 2, 2048
SEQ = 64
REPORT_KEYS = (
    "method",
    "budget_bits",
    "effective_bpw_experts",
    "effective_bpw_model",
    "perplexity_fp",
    "perplexity_q",
    "kl_divergence",
    "top1_agreement",
    "time_s",
    "layers",
    "starved_experts",
    "allocation_gaps",
)
STAGES = (
    "tokenize",
    "forward",
    "basis",
    "calibration",
    "coefficients",
    "allocation",
    "pack",
    "write",
    "evaluate",
)


def base_args(model_dir, out_dir, calib, *extra, scale_fit=False):
    """The command line quantizing the tiny model; without the per-expert scale fit (on by
    default) unless `scale_fit`: the fit has its own end-to-end tests (test_expert_scale_tuning,
    the multi-host runs, test_pipeline's default run) and would only add time elsewhere."""
    return [
        "--config",
        TINY_CONFIG,
        f"--config.model_path={model_dir}",
        f"--config.output_dir={out_dir}",
        "--config.num_calib_tokens=1024",
        f"--config.seq_len={SEQ}",
        "--config.eval_max_tokens=1024",
        "--config.group_size=64",
        f"--config.calib_text={calib}",
        *([] if scale_fit else ["--config.scale_tuning_steps=0"]),
        *extra,
    ]


def read_report(d):
    """report.json with timings.json merged back (run timings are kept out of report.json so reruns
    compare equal)."""
    r = json.loads((Path(d) / "report.json").read_text())
    assert "time_s" not in r
    r.update(json.loads((Path(d) / "timings.json").read_text()))
    return r
