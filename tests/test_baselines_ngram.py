"""Tests for reference_model.ngram_baselines against a brute-force pure-Python reference."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from bitsmoe_jax.io.data import read_text, tokenize_text
from reference_model.ngram_baselines import (
    DEFAULT_WEIGHT_GRID,
    bigram_perplexity,
    bigram_target_nll,
    choose_bigram_weight,
    unigram_log_probs,
    unigram_perplexity,
)
from reference_model.tokenizer import train_bpe_tokenizer

V = 7
# Token 6 never occurs in training (add-one must give it mass); token 5 occurs only as the last
# training token, so it is never a bigram context and the model must fall back to the unigram.
TRAIN = [0, 1, 2, 1, 2, 3, 0, 1, 4, 4, 1, 2, 0, 3, 3, 1, 5]
VALID = [1, 2, 3, 0, 1, 2, 4, 1, 2, 6, 1]
TEST = [2, 1, 2, 0, 3, 5, 6, 5, 1, 4, 4, 2, 1]


def ref_unigram_prob(train: list[int], vocab: int, w: int) -> float:
    return (train.count(w) + 1) / (len(train) + vocab)


def ref_bigram_prob(train: list[int], vocab: int, weight: float, v: int, w: int) -> float:
    contexts = Counter(train[i] for i in range(len(train) - 1))
    pairs = Counter((train[i], train[i + 1]) for i in range(len(train) - 1))
    uni = ref_unigram_prob(train, vocab, w)
    if contexts[v] == 0:
        return uni
    return weight * pairs[(v, w)] / contexts[v] + (1 - weight) * uni


def ref_unigram_ppl(train: list[int], test: list[int], vocab: int) -> float:
    nll = [-math.log(ref_unigram_prob(train, vocab, test[i])) for i in range(1, len(test))]
    return math.exp(sum(nll) / len(nll))


def ref_bigram_mean_nll(train: list[int], test: list[int], vocab: int, weight: float) -> float:
    nll = [
        -math.log(ref_bigram_prob(train, vocab, weight, test[i - 1], test[i]))
        for i in range(1, len(test))
    ]
    return sum(nll) / len(nll)


def test_unigram_matches_bruteforce() -> None:
    got = unigram_perplexity(np.array(TRAIN), np.array(TEST), V)
    assert got == pytest.approx(ref_unigram_ppl(TRAIN, TEST, V), rel=1e-12)
    log_p = unigram_log_probs(np.array(TRAIN), V)
    assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-12)
    assert log_p[6] == pytest.approx(math.log(1 / (len(TRAIN) + V)))


def test_unigram_scores_all_but_first() -> None:
    """Changing only the first test token must not change the perplexity."""
    a = unigram_perplexity(np.array(TRAIN), np.array(TEST), V)
    b = unigram_perplexity(np.array(TRAIN), np.array([6] + TEST[1:]), V)
    c = unigram_perplexity(np.array(TRAIN), np.array(TEST[:-1] + [6]), V)
    assert a == b and a != c


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.77, 0.99])
def test_bigram_matches_bruteforce(weight: float) -> None:
    nll = bigram_target_nll(np.array(TRAIN), np.array(TEST), V, weight)
    expected = [
        -math.log(ref_bigram_prob(TRAIN, V, weight, TEST[i - 1], TEST[i]))
        for i in range(1, len(TEST))
    ]
    np.testing.assert_allclose(nll, expected, rtol=1e-12)
    ppl = bigram_perplexity(np.array(TRAIN), np.array(TEST), V, weight=weight)
    assert ppl == pytest.approx(math.exp(ref_bigram_mean_nll(TRAIN, TEST, V, weight)), rel=1e-12)


def test_bigram_conditionals_are_distributions() -> None:
    """For every context (seen, unseen, never-a-context) the probabilities sum to one."""
    train = np.array(TRAIN)
    for v in range(V):
        probs = [math.exp(-bigram_target_nll(train, np.array([v, w]), V, 0.6)[0]) for w in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-12)


def test_bigram_weight_zero_is_unigram() -> None:
    assert bigram_perplexity(np.array(TRAIN), np.array(TEST), V, weight=0.0) == pytest.approx(
        unigram_perplexity(np.array(TRAIN), np.array(TEST), V), rel=1e-12
    )


def test_weight_chosen_on_validation_by_bruteforce_grid() -> None:
    grid = [round(0.01 * k, 2) for k in range(100)]
    scores = [ref_bigram_mean_nll(TRAIN, VALID, V, w) for w in grid]
    best = min(scores)
    chosen = choose_bigram_weight(np.array(TRAIN), np.array(VALID), V)
    assert chosen in grid
    assert ref_bigram_mean_nll(TRAIN, VALID, V, chosen) <= best + 1e-12
    assert 0.0 < chosen < 0.99  # interior optimum on this corpus, so the search matters
    ppl = bigram_perplexity(np.array(TRAIN), np.array(TEST), V, valid_tokens=np.array(VALID))
    assert ppl == pytest.approx(math.exp(ref_bigram_mean_nll(TRAIN, TEST, V, chosen)), rel=1e-12)
    np.testing.assert_array_equal(DEFAULT_WEIGHT_GRID, grid)
    # A custom grid is honoured.
    assert choose_bigram_weight(np.array(TRAIN), np.array(VALID), V, grid=[0.05]) == 0.05


def test_validation_errors() -> None:
    train, test = np.array(TRAIN), np.array(TEST)
    with pytest.raises(ValueError):
        unigram_perplexity(train, np.array([1, 7]), V)  # id out of range
    with pytest.raises(ValueError):
        unigram_perplexity(train, np.array([1]), V)  # nothing to score
    with pytest.raises(ValueError):
        bigram_perplexity(train, test, V)  # neither valid_tokens nor weight
    with pytest.raises(ValueError):
        bigram_perplexity(train, test, V, valid_tokens=np.array(VALID), weight=0.5)
    with pytest.raises(ValueError):
        bigram_target_nll(train, test, V, 1.0)
    with pytest.raises(ValueError):
        choose_bigram_weight(train, np.array(VALID), V, grid=[0.5, 1.0])


def test_real_text_ordering() -> None:
    """On real Shakespeare the bigram beats the unigram, which beats the uniform distribution."""
    train_text = read_text("shakespeare_train")[:200_000]
    tok = train_bpe_tokenizer(train_text, vocab_size=512)
    train = tokenize_text(tok, train_text)
    valid = tokenize_text(tok, read_text("shakespeare_valid")[:50_000])
    test = tokenize_text(tok, read_text("shakespeare_test")[:50_000])
    uni = unigram_perplexity(train, test, 512)
    bi = bigram_perplexity(train, test, 512, valid_tokens=valid)
    assert bi < 0.8 * uni < 0.8 * 512
