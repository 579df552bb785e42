"""Tests for bitsmoe_jax.io.data: shipped corpora, tokenization, strided windows, training
batches."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers

from bitsmoe_jax.io import data
from bitsmoe_jax.io.data import (
    ASSET_DATA_DIR,
    SHIPPED_SHA256,
    SHIPPED_TEXTS,
    Window,
    load_tokenizer,
    read_text,
    resolve_text,
    strided_windows,
    tokenize_text,
    training_batches,
)
from reference_model.tokenizer import save_hf_tokenizer, train_bpe_tokenizer

SAMPLE_CHARS = 200_000

# Whitespace patterns around newlines are where chunked encoding could go wrong: runs of blank
# lines, spaces before and after newlines, tabs, trailing whitespace, the special token, and
# non-ASCII text (never a cut point) right before newlines.
EDGE_CASES = (
    "ACT I.\n\n  SCENE 1.\nHAMLET.\n To be, or not to be:\n\n\n\tthat is the question.  \n"
    "word \nword\t\nword.\n\nwhat's\n'tis<|endoftext|>\nnext<|endoftext|>\n\n"
    "caf\u00e9\nna\u00efve\u2014dash\n\u00e9\n\n12\n34 \n5\n!\n?\n\n \n  \n"
    "end with spaces   "
)


@pytest.fixture(scope="module")
def train_sample() -> str:
    return read_text("shakespeare_train")[:SAMPLE_CHARS]


@pytest.fixture(scope="module")
def small_tokenizer(train_sample: str) -> tokenizers.Tokenizer:
    tok = train_bpe_tokenizer(train_sample, vocab_size=1024)
    # Merged whitespace runs are what a wrong cut would split differently; make sure they exist.
    assert tok.token_to_id("\u010a\u010a") is not None  # "\n\n" in byte-level symbols
    return tok


# --------------------------------------------------------------------------- shipped texts


@pytest.mark.parametrize("name", sorted(SHIPPED_TEXTS))
def test_shipped_text_matches_recorded_sha256(name: str) -> None:
    text = read_text(name)
    assert len(text) > 100_000
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == SHIPPED_SHA256[name]


def test_provenance_records_same_hashes_and_credit() -> None:
    provenance = (ASSET_DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    assert "Open Shakespeare, Open Knowledge Foundation" in provenance
    assert "public domain" in provenance and "CC-BY 2.5" in provenance
    for name, path in SHIPPED_TEXTS.items():
        row = next(line for line in provenance.splitlines() if f"`{path.name}`" in line)
        assert SHIPPED_SHA256[name] in row


@pytest.mark.parametrize("name", sorted(SHIPPED_TEXTS))
def test_shipped_gzip_is_reproducible(name: str) -> None:
    """gzip -n: no stored file name and mtime 0, so re-compressing gives identical bytes."""
    raw = SHIPPED_TEXTS[name].read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08"
    flags = raw[3]
    assert flags & 0x08 == 0, "file name stored in gzip header"
    assert raw[4:8] == b"\x00\x00\x00\x00", "non-zero mtime in gzip header"


def test_splits_are_disjoint_works() -> None:
    train, valid, test = (read_text(f"shakespeare_{s}") for s in ("train", "valid", "test"))
    assert "HAMLET" in test and "TEMPEST" in test.upper()
    assert "MACBETH" in valid.upper()
    # A distinctive line of each held-out play must not occur in the training split.
    assert "To be, or not to be" in test and "To be, or not to be" not in train
    assert "Double, double" in valid and "Double, double" not in train


def test_resolve_text_names_and_paths(tmp_path) -> None:
    assert resolve_text("milton") == SHIPPED_TEXTS["milton"]
    plain = tmp_path / "a.txt"
    plain.write_text("Hello, world\u00e9\n", encoding="utf-8")
    zipped = tmp_path / "b.txt.gz"
    with gzip.open(zipped, "wb") as fh:
        fh.write(b"Zipped text\n")
    assert resolve_text(plain) == plain
    assert resolve_text(str(zipped)) == zipped
    assert read_text(plain) == "Hello, world\u00e9\n"
    assert read_text(str(zipped)) == "Zipped text\n"


def test_milton_splits_cut_the_text_by_lines_in_order() -> None:
    full = read_text("milton")
    lines = full.splitlines(keepends=True)
    parts = [read_text(f"milton_{s}") for s in ("train", "valid", "test")]
    assert "".join(parts) == full  # disjoint, in order, nothing lost
    sizes = [len(p.splitlines()) for p in parts]
    assert sizes == [
        int(0.9 * len(lines)),
        int(0.95 * len(lines)) - int(0.9 * len(lines)),
        len(lines) - int(0.95 * len(lines)),
    ]
    assert "Of Mans First Disobedience" in parts[0]
    # the poem's last line is in the test split only
    assert "Through EDEN took thir solitarie way" in parts[2]
    assert "Through EDEN took thir solitarie way" not in parts[0] + parts[1]
    assert resolve_text("milton_test") == SHIPPED_TEXTS["milton"]  # the file it is cut from


def test_resolve_text_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_text("shakespear_test")
    for name in (*SHIPPED_TEXTS, "milton_train", "milton_test"):
        assert repr(name) in str(excinfo.value)
    wrong = tmp_path / "data.bin"
    wrong.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.txt"):
        resolve_text(wrong)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(byte 3: b'\\xe9'\)"):
        read_text(bad)


# --------------------------------------------------------------------------- tokenizer I/O


def test_load_tokenizer(tmp_path, small_tokenizer: tokenizers.Tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    save_hf_tokenizer(small_tokenizer, tmp_path, model_max_length=128)
    loaded = load_tokenizer(tmp_path)
    assert loaded.to_str() == small_tokenizer.to_str()


def test_tokenize_text_equals_whole_string_encode(
    train_sample: str, small_tokenizer: tokenizers.Tokenizer
) -> None:
    text = (
        EDGE_CASES + train_sample[:50_000] + EDGE_CASES + read_text("milton")[:20_000] + EDGE_CASES
    )
    # chunk_chars=1 cuts at every safe newline, so thousands of cut points are exercised.
    pieces = data._chunks(text, 1)
    assert len(pieces) > 1000 and "".join(pieces) == text
    # Vocabulary-independent check: the cuts are pre-token boundaries.
    pre = small_tokenizer.pre_tokenizer
    assert [p for piece in pieces for p, _ in pre.pre_tokenize_str(piece)] == [
        p for p, _ in pre.pre_tokenize_str(text)
    ]
    expected = small_tokenizer.encode(text, add_special_tokens=False).ids
    got = tokenize_text(small_tokenizer, text, chunk_chars=1)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(expected))
    # Default chunk size on the full sample, and decoding restores the text exactly.
    got_default = tokenize_text(small_tokenizer, train_sample)
    np.testing.assert_array_equal(
        got_default, np.asarray(small_tokenizer.encode(train_sample, add_special_tokens=False).ids)
    )
    assert small_tokenizer.decode(got_default.tolist()) == train_sample
    assert tokenize_text(small_tokenizer, "").shape == (0,)


def test_naive_line_splitting_would_differ(small_tokenizer: tokenizers.Tokenizer) -> None:
    """Guards the premise of the careful cut: cutting after a newline changes the pre-tokens
    (a chunk ending in blank lines keeps its whitespace run whole), cutting before one does not."""
    pre = small_tokenizer.pre_tokenizer
    text = "Farewell.\n\nEnter HAMLET.\n"

    def pieces(parts: list[str]) -> list[str]:
        return [p for part in parts for p, _ in pre.pre_tokenize_str(part)]

    whole = pieces([text])
    assert pieces(["Farewell.\n\n", "Enter HAMLET.\n"]) != whole
    assert pieces(["Farewell.", "\n\nEnter HAMLET.", "\n"]) == whole
    np.testing.assert_array_equal(
        tokenize_text(small_tokenizer, text, chunk_chars=1),
        small_tokenizer.encode(text, add_special_tokens=False).ids,
    )


def test_tokenize_text_other_tokenizers_fall_back(train_sample: str) -> None:
    """A prefix-space tokenizer cannot be cut at newlines; the result must still equal encode()."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([train_sample[:50_000]], trainer=trainer)
    assert not data._can_chunk(tok)
    text = EDGE_CASES + train_sample[:20_000]
    np.testing.assert_array_equal(
        tokenize_text(tok, text, chunk_chars=64), tok.encode(text, add_special_tokens=False).ids
    )


def test_tokenize_text_ignores_truncation(
    small_tokenizer: tokenizers.Tokenizer, train_sample: str
) -> None:
    tok = tokenizers.Tokenizer.from_str(small_tokenizer.to_str())
    tok.enable_truncation(max_length=16)
    text = train_sample[:5_000]
    got = tokenize_text(tok, text)
    assert got.shape[0] > 16
    np.testing.assert_array_equal(got, small_tokenizer.encode(text, add_special_tokens=False).ids)
    assert (
        tok.truncation is not None and tok.truncation["max_length"] == 16
    )  # caller's object untouched


# --------------------------------------------------------------------------- strided windows


def _literal_contract(
    n: int, seq_len: int, stride: int
) -> tuple[list[tuple[int, int]], list[set[int]]]:
    """Independent reference: windows at 0, S, 2S, ... while start < N-1, each scoring the targets
    start+1..end-1 that lie at or after the previous window's end (the first scores all)."""
    spans, scored = [], []
    prev_end = None
    start = 0
    while start < n - 1:
        end = min(start + seq_len, n)
        targets = set(range(start + 1, end))
        if prev_end is not None:
            targets = {t for t in targets if t >= prev_end}
        spans.append((start, end))
        scored.append(targets)
        prev_end = end
        start += stride
    return spans, scored


def test_strided_windows_worked_example() -> None:
    assert strided_windows(10, 4, 2) == [
        Window(0, 4, 1),
        Window(2, 6, 4),
        Window(4, 8, 6),
        Window(6, 10, 8),
    ]
    assert strided_windows(2, 4, 3) == [Window(0, 2, 1)]
    assert strided_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 101])
@pytest.mark.parametrize("seq_len", [2, 3, 8, 16, 200])
@pytest.mark.parametrize("stride", [1, 2, 3, 7, 8, 9, 16, 33])
def test_strided_windows_against_literal_contract(n: int, seq_len: int, stride: int) -> None:
    windows = strided_windows(n, seq_len, stride)
    spans, scored = _literal_contract(n, seq_len, stride)
    # Same windows in the same order, except trailing ones that would score nothing.
    nonempty = [i for i, s in enumerate(scored) if s]
    assert nonempty == list(range(len(nonempty)))
    assert [(w.start, w.end) for w in windows] == spans[: len(nonempty)]
    counts = np.zeros(n, dtype=np.int64)
    for w, expected in zip(windows, scored, strict=False):
        assert set(range(w.score_from, w.end)) == expected
        counts[w.score_from : w.end] += 1
    assert counts[0] == 0
    assert np.all(counts <= 1)
    if stride < seq_len:
        assert np.all(counts[1:] == 1), "every position 1..N-1 is scored exactly once"
        assert windows[-1].end == n
        for w in windows[1:]:
            assert w.score_from - w.start >= seq_len - stride  # minimum left context
    elif stride == seq_len:
        missing = {t for t in range(1, n) if counts[t] == 0}
        assert missing == set(range(seq_len, n, seq_len))
    else:
        assert counts.sum() == sum(w.end - w.start - 1 for w in windows)
        assert counts.sum() == sum(min(s + seq_len, n) - s - 1 for s in range(0, n - 1, stride))


def test_strided_windows_validation() -> None:
    for args in [(1, 4, 2), (10, 1, 1), (10, 4, 0)]:
        with pytest.raises(ValueError):
            strided_windows(*args)


# --------------------------------------------------------------------------- training batches


def test_training_batches_are_contiguous_crops() -> None:
    n, seq_len, batch = 1000, 31, 8
    tokens = np.arange(n, dtype=np.int64) + 5  # value identifies the position
    it = training_batches(tokens, seq_len, batch, seed=0)
    seen_starts = []
    for _ in range(50):
        b = next(it)
        assert b.shape == (batch, seq_len + 1) and b.dtype == np.int32
        starts = b[:, 0] - 5
        np.testing.assert_array_equal(b, starts[:, None] + 5 + np.arange(seq_len + 1)[None, :])
        assert starts.min() >= 0 and starts.max() <= n - seq_len - 1
        seen_starts.extend(starts.tolist())
    assert len(set(seen_starts)) > 200  # random, not a fixed chunking


def test_training_batches_cover_both_extremes() -> None:
    tokens = np.arange(10)
    it = training_batches(tokens, seq_len=8, batch_size=64, seed=3)
    starts = {int(row[0]) for row in next(it)}
    assert starts == {0, 1}  # N - (seq_len + 1) + 1 = 2 possible crops


def test_training_batches_deterministic() -> None:
    tokens = np.random.default_rng(1).integers(0, 4096, size=5000)
    a = [next(it) for it in [training_batches(tokens, 64, 4, seed=7)] for _ in range(5)]
    b = [next(it) for it in [training_batches(tokens, 64, 4, seed=7)] for _ in range(5)]
    c = [next(it) for it in [training_batches(tokens, 64, 4, seed=8)] for _ in range(5)]
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=False))


def test_training_batches_validation() -> None:
    # Errors surface at the call, not at the first next(), so misconfiguration fails early.
    with pytest.raises(ValueError):
        training_batches(np.arange(8), seq_len=8, batch_size=1, seed=0)
    with pytest.raises(ValueError):
        training_batches(np.zeros((4, 4), dtype=np.int32), seq_len=2, batch_size=1, seed=0)
    with pytest.raises(ValueError):
        training_batches(np.arange(100), seq_len=4, batch_size=0, seed=0)
    with pytest.raises(ValueError):
        training_batches(np.linspace(0, 1, 100), seq_len=4, batch_size=1, seed=0)
