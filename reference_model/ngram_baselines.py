"""Count-based unigram and bigram perplexities: floors the reference MoE must clearly beat.

A transformer's perplexity on held-out Shakespeare means little on its own: "lower than a
smoothed bigram model on the same tokens" is the evidence that it learned more than token
frequencies and adjacent-pair statistics, and the gap to these baselines is the yardstick for
how much a quantized model has lost. Both baselines use the same tokenization and the same scoring
convention as the neural evaluation: every test token after the first is a target (the first has
no context), natural log, ``perplexity = exp(mean NLL)``.

Smoothing:

* unigram -- add-one (Laplace): ``p(w) = (c(w) + 1) / (N + V)``, so unseen tokens keep mass;
* bigram -- Jelinek-Mercer interpolation with that unigram:
  ``p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p_uni(w)``, and ``p_uni(w)`` alone when the
  context ``v`` never occurs as a context in training (``c(v) = 0``). ``c(v)`` counts ``v`` at
  positions ``0 .. N-2`` of the training stream, so each context's ML distribution sums to one.
  ``lam`` is chosen on a held-out split (never the test split) by minimizing its NLL over a
  grid; the held-out NLL is convex in ``lam``, so a 0.01 grid is within 0.005 of the optimum.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DEFAULT_WEIGHT_GRID",
    "unigram_log_probs",
    "unigram_perplexity",
    "bigram_target_nll",
    "choose_bigram_weight",
    "bigram_perplexity",
]

#: Candidate interpolation weights 0.00, 0.01, ..., 0.99. 1.0 is excluded: it gives unseen pairs
#: probability zero, i.e. infinite NLL on any realistic held-out text.
DEFAULT_WEIGHT_GRID: np.ndarray = np.round(np.arange(100) * 0.01, 2)


def _as_tokens(tokens: np.ndarray, vocab_size: int, name: str, min_len: int) -> np.ndarray:
    """Validate a token stream and return it as 1-D int64 (int64 so ``prev * V + next`` cannot
    overflow)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.shape[0] < min_len:
        raise ValueError(f"{name} needs at least {min_len} tokens, got {arr.shape[0]}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(
            f"{name} has ids outside [0, {vocab_size}): min {arr.min()}, max {arr.max()}"
        )
    return arr


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Natural-log add-one unigram probabilities, ``float64 [vocab_size]``, summing to one."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    train = _as_tokens(train_tokens, vocab_size, "train_tokens", 0)
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    return np.log(counts + 1.0) - math.log(train.shape[0] + vocab_size)


def unigram_perplexity(train_tokens: np.ndarray, test_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of ``test_tokens[1:]`` under the add-one unigram fitted on ``train_tokens``.

    The first test token is skipped so that exactly the same targets are scored as by the bigram
    model and the neural model, which need a previous token.
    """
    log_p = unigram_log_probs(train_tokens, vocab_size)
    test = _as_tokens(test_tokens, vocab_size, "test_tokens", 2)
    return float(math.exp(-float(np.mean(log_p[test[1:]]))))


def _bigram_components(
    train: np.ndarray, stream: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target ``stream[1:]``: ML bigram probability, add-one unigram probability, context seen.

    Bigram counts are kept sparse (sorted ``prev * V + next`` keys with counts) rather than as a
    dense ``V x V`` table, which for V = 4096 would be 16M cells for a few hundred thousand
    distinct pairs.
    """
    p_uni = np.exp(unigram_log_probs(train, vocab_size))
    keys, pair_counts = np.unique(train[:-1] * vocab_size + train[1:], return_counts=True)
    context_counts = np.bincount(train[:-1], minlength=vocab_size)
    prev, nxt = stream[:-1], stream[1:]
    query = prev * vocab_size + nxt
    # ``train`` has >= 2 tokens, so ``keys`` is non-empty and the clipped index is always valid.
    idx = np.minimum(np.searchsorted(keys, query), keys.shape[0] - 1)
    pair = np.where(keys[idx] == query, pair_counts[idx], 0).astype(np.float64)
    ctx = context_counts[prev].astype(np.float64)
    has_context = ctx > 0
    p_ml = np.divide(pair, ctx, out=np.zeros_like(pair), where=has_context)
    return p_ml, p_uni[nxt], has_context


def _interpolated_nll(
    p_ml: np.ndarray, p_uni: np.ndarray, has_context: np.ndarray, weight: float
) -> np.ndarray:
    """Per-target NLL of the interpolated bigram; unseen contexts fall back to the unigram."""
    p = np.where(has_context, weight * p_ml + (1.0 - weight) * p_uni, p_uni)
    return -np.log(p)


def bigram_target_nll(
    train_tokens: np.ndarray, tokens: np.ndarray, vocab_size: int, weight: float
) -> np.ndarray:
    """Natural-log NLL of each target ``tokens[1:]`` under the interpolated bigram, ``float64
    [n-1]``."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight}")
    train = _as_tokens(train_tokens, vocab_size, "train_tokens", 2)
    stream = _as_tokens(tokens, vocab_size, "tokens", 2)
    return _interpolated_nll(*_bigram_components(train, stream, vocab_size), weight)


def choose_bigram_weight(
    train_tokens: np.ndarray,
    valid_tokens: np.ndarray,
    vocab_size: int,
    grid: np.ndarray | None = None,
) -> float:
    """The grid weight ``lam`` minimizing the mean bigram NLL of ``valid_tokens[1:]``.

    Ties go to the smallest weight (first in the grid). The validation split is only used here,
    so the test perplexity stays an honest held-out number.
    """
    candidates = DEFAULT_WEIGHT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if candidates.ndim != 1 or candidates.size == 0:
        raise ValueError("grid must be a non-empty 1-D sequence of weights")
    if candidates.min() < 0.0 or candidates.max() >= 1.0:
        raise ValueError("grid weights must lie in [0, 1)")
    train = _as_tokens(train_tokens, vocab_size, "train_tokens", 2)
    valid = _as_tokens(valid_tokens, vocab_size, "valid_tokens", 2)
    components = _bigram_components(train, valid, vocab_size)
    mean_nll = [float(np.mean(_interpolated_nll(*components, float(w)))) for w in candidates]
    return float(candidates[int(np.argmin(mean_nll))])


def bigram_perplexity(
    train_tokens: np.ndarray,
    test_tokens: np.ndarray,
    vocab_size: int,
    *,
    valid_tokens: np.ndarray | None = None,
    weight: float | None = None,
) -> float:
    """Perplexity of ``test_tokens[1:]`` under the bigram interpolated with the add-one unigram.

    Exactly one of ``valid_tokens`` (the weight is then chosen on it by
    :func:`choose_bigram_weight`) or an explicit ``weight`` must be given; choosing the weight
    on the test split itself would flatter the baseline.
    """
    if (valid_tokens is None) == (weight is None):
        raise ValueError("pass exactly one of valid_tokens (to fit the weight) or weight")
    if weight is None:
        weight = choose_bigram_weight(train_tokens, valid_tokens, vocab_size)
    nll = bigram_target_nll(train_tokens, test_tokens, vocab_size, weight)
    return float(math.exp(float(np.mean(nll))))
