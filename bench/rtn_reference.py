"""Uniform round-to-nearest on the reference model, for the README's comparison rows.

    python bench/rtn_reference.py [--model DIR] [--bits 2 3 4] [--group-size 128]

Same evaluation as the quantizer's report (whole Shakespeare test split, seq 256, stride 256,
KL to the unquantized model). Prints one markdown row per bit-width.
"""

from __future__ import annotations

import argparse
import time

from bitsmoe_jax.baselines.rtn import apply_rtn
from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REFERENCE_DIR))
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    ids = tokenize_text(load_tokenizer(args.model), read_text("shakespeare_test"))
    ref, _ = load_model(args.model)
    print("| method | effective bpw (experts) | perplexity | KL | top-1 | time (s) |")
    print("|---|---|---|---|---|---|")
    for b in args.bits:
        t = time.time()
        model, _ = load_model(args.model)
        bpw = apply_rtn(model, b, args.group_size)
        qt = time.time() - t
        r = evaluate_model(model, ids, args.seq_len, args.seq_len, batch_size=8, reference=ref)
        print(
            f"| RTN {b}-bit g{args.group_size} | {bpw:.3f} | {r['perplexity']:.2f} | "
            f"{r['kl_divergence']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {qt:.1f} |",
            flush=True,
        )
    print(
        f"(unquantized perplexity {r['reference_perplexity']:.2f} over {r['tokens_scored']} tokens)"
    )


if __name__ == "__main__":
    main()
