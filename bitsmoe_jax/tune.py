"""`python -m bitsmoe_jax.tune --model QUANTIZED_DIR --out TUNED_DIR`: fit a quantized
checkpoint's stored scales end to end, every code and bit unchanged.

The factors' group scales and the bases' row scales are fitted to KL(unquantized ‖ quantized) of
the logits on calibration windows, stopped early on held-out windows and kept only if they beat
the untuned scales there (`bitsmoe_jax/serve/scale_tuning.py`). The output is a complete
quantized checkpoint in the same format with the same effective bits (only the bf16 scale arrays
differ), written atomically; its report.json and quantized.json gain a "tuning" section (held-out
KL before and after, the steps, the time) and, with `--eval-text`, the evaluation of the model
before and after tuning on that text. The report's own evaluation numbers are the untuned run's.

Defaults come from the run that wrote QUANTIZED_DIR (its quantized.json): the unquantized model
(`model_path`), the calibration text and the window length. Both models are held in memory: for
models whose unquantized weights fit the host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.checkpoint import atomic_directory, load_tree
from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.serve.quantized_checkpoint import (
    FORMAT_VERSION,
    QUANT_META,
    groups_dir,
    json_default,
    load_quantized,
    read_meta,
    save_layer,
)
from bitsmoe_jax.serve.scale_tuning import TuneConfig, calibration_windows, tune_scales


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bitsmoe_jax.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a quantized checkpoint directory")
    p.add_argument("--out", required=True, help="where to write the tuned checkpoint")
    p.add_argument(
        "--reference", default=None, help="the unquantized model (default: the run's model_path)"
    )
    p.add_argument(
        "--text",
        default=None,
        help="calibration text: a shipped name or a .txt file (default: the run's calib_text)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    p.add_argument("--windows", type=int, default=256, help="windows taken from the text (256)")
    p.add_argument(
        "--holdout-fraction", type=float, default=0.1, help="windows held out (default 0.1)"
    )
    p.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate on log-scales")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-text", default=None, help="evaluate before and after on this text (optional)"
    )
    p.add_argument("--eval-max-tokens", type=int, default=65536)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src = Path(args.model).expanduser()
    try:
        meta = read_meta(src)
        run = meta.get("quantization", {})
        reference_dir = args.reference or run.get("model_path")
        text = args.text or run.get("calib_text")
        seq_len = int(args.seq_len or run.get("seq_len") or 256)
        if not reference_dir:
            raise ValueError("no --reference given and the run recorded no model_path")
        if not text:
            raise ValueError("no --text given and the run recorded no calib_text")
        if not 0 < args.holdout_fraction < 1:
            raise ValueError(f"--holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
        cfg = TuneConfig(args.steps, args.lr, args.batch_size, args.eval_every, args.seed)
        out = Path(args.out).expanduser()
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out}: output directory already exists (pass --overwrite)")
        reference, _ = load_model(reference_dir)
        model, config = load_quantized(src, backend="xla")
        tokens = tokenize_text(load_tokenizer(reference_dir), read_text(text))
        windows, holdout = calibration_windows(
            tokens, seq_len, args.windows, args.holdout_fraction, args.seed
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _log(
        f"{src}: {len(windows)} training and {len(holdout)} held-out windows of {seq_len} tokens "
        f"from {text}"
    )
    evaluation = {}
    if args.eval_text:
        eval_tokens = tokenize_text(load_tokenizer(reference_dir), read_text(args.eval_text))
        eval_tokens = eval_tokens[: args.eval_max_tokens]
        evaluation["before"] = evaluate_model(
            model, eval_tokens, seq_len, seq_len, batch_size=8, reference=reference
        )
    result = tune_scales(model, reference, windows, holdout, cfg, log=_log)
    if args.eval_text:
        evaluation["after"] = evaluate_model(
            model, eval_tokens, seq_len, seq_len, batch_size=8, reference=reference
        )
        b, a = evaluation["before"], evaluation["after"]
        _log(
            f"{args.eval_text}: KL {b['kl_divergence']:.6f} -> {a['kl_divergence']:.6f}, "
            f"perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}"
        )
    tuning = {
        "reference": str(reference_dir),
        "text": str(text),
        "seq_len": seq_len,
        "windows": len(windows),
        "holdout_windows": len(holdout),
        "config": dataclasses.asdict(cfg),
        **dataclasses.asdict(result),
        **({"evaluation": {"text": args.eval_text, **evaluation}} if evaluation else {}),
    }
    write_tuned(src, out, model, config, tuning, args.overwrite)
    _log(f"wrote {out}")
    return 0


def write_tuned(src: Path, out: Path, model, config, tuning: dict, overwrite: bool) -> None:
    """`src` copied to `out` with each MoE layer's experts (the tuned scales) written anew and the
    tuning recorded in quantized.json and report.json — atomically."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        meta = json.loads((tmp / QUANT_META).read_text())
        for i in config.moe_layers:
            item = tmp / "params" / f"layer_{i:03d}"
            tree = load_tree(item)
            shutil.rmtree(item)
            shutil.rmtree(groups_dir(tmp, i), ignore_errors=True)  # format 1 has none
            experts = model.layers[i].mlp.experts
            meta["layers"][str(i)] = save_layer(
                tmp,
                i,
                tree["dense"],
                experts,
                tree.get("allocation"),
                meta["layers"][str(i)].get("expert_group_size"),
            )
        meta["version"] = FORMAT_VERSION
        meta["tuning"] = {k: v for k, v in tuning.items() if k != "evaluation"}
        (tmp / QUANT_META).write_text(json.dumps(meta, indent=1, default=json_default))
        report_path = tmp / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            report["tuning"] = tuning
            report_path.write_text(json.dumps(report, indent=1, default=json_default))


if __name__ == "__main__":
    sys.exit(main())
