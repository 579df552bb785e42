"""Tests for reference_model.tokenizer: byte-level BPE training and Hugging Face export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers

from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text
from reference_model.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    VOCAB_MULTIPLE,
    save_hf_tokenizer,
    train_bpe_tokenizer,
)

VOCAB = 640

SAMPLES = [
    "To be, or not to be: that is the question:",
    "Hello",
    "  leading spaces and trailing  ",
    "line one\n\nline two\n\tTabbed<|endoftext|>after the separator",
    "Unseen bytes: caf\u00e9, na\u00efve, \u4e2d\u6587, \U0001f600 and \x00 control",
    "",
]


@pytest.fixture(scope="module")
def train_sample() -> str:
    return read_text("shakespeare_train")[:200_000]


@pytest.fixture(scope="module")
def tok(train_sample: str) -> tokenizers.Tokenizer:
    return train_bpe_tokenizer(train_sample, vocab_size=VOCAB)


def test_default_vocab_size() -> None:
    assert DEFAULT_VOCAB_SIZE == 4096
    assert DEFAULT_VOCAB_SIZE % VOCAB_MULTIPLE == 0 and VOCAB_MULTIPLE == 128


def test_layout(tok: tokenizers.Tokenizer) -> None:
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    assert tok.token_to_id(EOS_TOKEN) == 0
    added = tok.get_added_tokens_decoder()
    assert list(added) == [0] and added[0].content == EOS_TOKEN and added[0].special
    assert isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel)
    assert tok.pre_tokenizer.add_prefix_space is False
    assert isinstance(tok.decoder, decoders.ByteLevel)
    assert tok.normalizer is None
    vocab = tok.get_vocab()
    # All 256 byte symbols are present, so no text can produce an unknown token.
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert sorted(vocab.values()) == list(range(VOCAB))


def test_no_prefix_space_and_roundtrip(tok: tokenizers.Tokenizer) -> None:
    assert not tok.encode("Hello").tokens[0].startswith("\u0120")  # "Ġ" marks a leading space
    assert tok.encode(" Hello").tokens[0].startswith("\u0120")
    for text in SAMPLES:
        enc = tok.encode(text, add_special_tokens=False)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text
    # The special token is one id when it appears in text.
    assert tok.encode("a<|endoftext|>b").ids.count(0) == 1


def test_learns_frequent_words(tok: tokenizers.Tokenizer, train_sample: str) -> None:
    """Merges must compress: raw bytes give one token per character; 640 tokens give < 1 per 2."""
    ids = tokenize_text(tok, train_sample)
    assert len(ids) < len(train_sample) / 2
    assert len(tok.encode(" the").ids) == 1 and len(tok.encode(" and").ids) == 1


def test_deterministic(train_sample: str, tok: tokenizers.Tokenizer) -> None:
    again = train_bpe_tokenizer(train_sample, vocab_size=VOCAB)
    assert again.to_str() == tok.to_str()
    different = train_bpe_tokenizer(train_sample[:100_000], vocab_size=VOCAB)
    assert different.to_str() != tok.to_str()


def test_validation(train_sample: str) -> None:
    for bad in (0, 100, 4000, 4097, 256):
        with pytest.raises(ValueError):
            train_bpe_tokenizer(train_sample[:10_000], vocab_size=bad)
    with pytest.raises(ValueError, match="fewer than"):
        train_bpe_tokenizer("tiny text tiny text", vocab_size=512)
    with pytest.raises(ValueError):
        train_bpe_tokenizer("", vocab_size=512)


def test_save_files(tmp_path, tok: tokenizers.Tokenizer) -> None:
    out = save_hf_tokenizer(tok, tmp_path / "tk", model_max_length=256)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == EOS_TOKEN
    assert config["model_max_length"] == 256
    assert config["added_tokens_decoder"]["0"]["content"] == EOS_TOKEN
    assert json.loads((out / "special_tokens_map.json").read_text()) == {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
    }
    assert load_tokenizer(out).to_str() == tok.to_str()
    with pytest.raises(ValueError):
        save_hf_tokenizer(tok, tmp_path / "bad", model_max_length=0)


def test_transformers_autotokenizer_matches(
    tmp_path, tok: tokenizers.Tokenizer, train_sample: str
) -> None:
    transformers = pytest.importorskip("transformers")
    out = save_hf_tokenizer(tok, tmp_path / "hf", model_max_length=256)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert hf.bos_token == hf.eos_token == EOS_TOKEN
    assert hf.bos_token_id == hf.eos_token_id == 0
    assert hf.model_max_length == 256
    assert len(hf) == VOCAB
    texts = SAMPLES + [train_sample[1000:3000], read_text("milton")[:2000]]
    for text in texts:
        expected = tok.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False)["input_ids"] == expected
        assert hf(text)["input_ids"] == expected  # no BOS/EOS is silently added
        assert hf.decode(expected) == text
    batch = hf(texts[:4])["input_ids"]
    assert batch == [tok.encode(t).ids for t in texts[:4]]
    np.testing.assert_array_equal(
        np.asarray(hf(texts[-2])["input_ids"], dtype=np.int32), tokenize_text(tok, texts[-2])
    )
