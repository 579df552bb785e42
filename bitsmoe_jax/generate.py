"""`python -m bitsmoe_jax.generate --model DIR --prompt TEXT --max-new-tokens N [--temperature T
--top-p P --top-k K --seed S]`: text from an original (Hugging Face, converted) or quantized model.

Greedy by default (Hugging Face's `generate(do_sample=False)`); with `--temperature` above 0 the
tokens are sampled, reproducibly for a given `--seed`. Decoding stops at the model's end-of-text
token (`eos_token_id` of its config, or `--eos-token-id`). Prints the prompt followed by the
continuation. From Python: `bitsmoe_jax.inference.generate`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from bitsmoe_jax.evaluate import COMPUTE_DTYPES
from bitsmoe_jax.inference import generate
from bitsmoe_jax.io.data import load_tokenizer
from bitsmoe_jax.loading import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bitsmoe_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF, converted or quantized model directory")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (default 64)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--eos-token-id", type=int, default=None, help="stop token (default: the model config's)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)"
    )
    p.add_argument(
        "--dtype", choices=sorted(COMPUTE_DTYPES), default="float32", help="compute dtype"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        print(f"error: model directory not found: {model_dir}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer or model_dir)
        model, config = load_model(model_dir, dtype=COMPUTE_DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        print("error: the prompt is empty after tokenization", file=sys.stderr)
        return 2
    eos = args.eos_token_id if args.eos_token_id is not None else config.eos_token_id
    try:
        new = generate(
            model,
            jnp.asarray([ids], jnp.int32),
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            eos_token_id=eos,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(ids + [int(t) for t in new[0]], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
