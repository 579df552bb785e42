"""How much has the shipped reference MoE learned? Its test perplexity beside count baselines.

    python bench/reference_model.py [--model DIR] [--seq-len 256]

Prints the reference model's perplexity on the Shakespeare test split (strided, as `evaluate` does)
next to an add-one unigram and an interpolated bigram (weight chosen on the valid split) on exactly
the same tokens. Neural perplexity scores every token after the first window's first; the n-gram
models score every token after the first — the same targets up to the first token of each window.
"""

from __future__ import annotations

import argparse
import json

from bitsmoe_jax.evaluate import evaluate_model
from bitsmoe_jax.io.data import REFERENCE_DIR, load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from reference_model.ngram_baselines import bigram_perplexity, unigram_perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REFERENCE_DIR))
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    tok = load_tokenizer(args.model)
    ids = {s: tokenize_text(tok, read_text(f"shakespeare_{s}")) for s in ("train", "valid", "test")}
    vocab = tok.get_vocab_size()
    model, _ = load_model(args.model)
    res = evaluate_model(model, ids["test"], args.seq_len, args.seq_len, batch_size=8)
    row = {
        "test_tokens": int(len(ids["test"])),
        "moe_perplexity": round(res["perplexity"], 2),
        "unigram_perplexity": round(unigram_perplexity(ids["train"], ids["test"], vocab), 2),
        "bigram_perplexity": round(
            bigram_perplexity(ids["train"], ids["test"], vocab, valid_tokens=ids["valid"]), 2
        ),
        "seq_len": args.seq_len,
    }
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
