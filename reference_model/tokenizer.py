"""Train and save the byte-level BPE tokenizer of the small reference MoE model.

The reference model needs its own small vocabulary: a 4096-token vocabulary keeps the embedding
and LM-head matrices small relative to the experts (which are what BitsMoE quantizes), while
byte-level BPE guarantees that any text, including the out-of-domain Milton, encodes without
unknown tokens. The tokenizer is trained on the Shakespeare training split only, so held-out
perplexities are not flattered by merges fitted to the test plays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitsmoe_jax.io.data import read_text

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "VOCAB_MULTIPLE",
    "train_bpe_tokenizer",
    "train_shakespeare_tokenizer",
    "save_hf_tokenizer",
]

#: Vocabulary size of the reference model.
DEFAULT_VOCAB_SIZE: int = 4096
#: Vocabulary sizes must be multiples of this, so the embedding / LM-head dimensions tile cleanly
#: onto accelerator matrix units and kernel block sizes without padding.
VOCAB_MULTIPLE: int = 128
#: The only special token; id 0. Used as BOS, EOS and document separator, GPT-2 style.
EOS_TOKEN: str = "<|endoftext|>"

# 256 byte symbols plus the special token must fit before any merge is learned.
_MIN_VOCAB = len(pre_tokenizers.ByteLevel.alphabet()) + 1


def train_bpe_tokenizer(text: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer on ``text``.

    Layout: no normalizer (the text is kept byte-exact, so decode(encode(x)) == x);
    ``ByteLevel(add_prefix_space=False)`` pre-tokenizer (no invented leading space, so the token
    stream of a corpus is exactly its bytes); ``ByteLevel`` decoder; the full 256-symbol byte
    alphabet is seeded so that any UTF-8 text is encodable even if a byte never occurs in
    ``text``; ``<|endoftext|>`` is the only special token and gets id 0.

    Training is deterministic (the same text and size give identical JSON, also across
    processes), which lets the reference-model script re-create the shipped tokenizer exactly.

    Args:
        text: the training corpus (pass the training split only).
        vocab_size: final vocabulary size including the special token and the byte alphabet;
            a multiple of :data:`VOCAB_MULTIPLE`.

    Raises:
        ValueError: ``vocab_size`` not a positive multiple of 128, or ``text`` too small to learn
            that many merges (a short vocabulary would silently mismatch the model's embedding).
    """
    if vocab_size <= 0 or vocab_size % VOCAB_MULTIPLE != 0:
        raise ValueError(
            f"vocab_size must be a positive multiple of {VOCAB_MULTIPLE}, got {vocab_size}"
        )
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB} (byte alphabet + special token), got "
            f"{vocab_size}"
        )
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(
            f"the text supports only {got} tokens, fewer than the requested "
            f"vocab_size={vocab_size}; "
            "train on more text or ask for a smaller vocabulary"
        )
    if (
        tokenizer.token_to_id(EOS_TOKEN) != 0
    ):  # guaranteed by the trainer; checked because ids are baked into models
        raise RuntimeError(f"{EOS_TOKEN} did not get id 0")
    return tokenizer


def train_shakespeare_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """Train the reference tokenizer on the shipped Shakespeare *training* split only."""
    return train_bpe_tokenizer(read_text("shakespeare_train"), vocab_size)


def save_hf_tokenizer(
    tokenizer: tokenizers.Tokenizer, out_dir: str | os.PathLike[str], model_max_length: int
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The three files make ``out_dir`` loadable both by :func:`bitsmoe_jax.io.data.load_tokenizer`
    (which reads only ``tokenizer.json``) and by ``transformers.AutoTokenizer.from_pretrained``,
    which builds a ``PreTrainedTokenizerFast`` around the same ``tokenizer.json`` and therefore
    produces identical ids. The config pins what ``transformers`` would otherwise guess:
    BOS/EOS are ``<|endoftext|>``; ``clean_up_tokenization_spaces`` is off because its
    English-specific space removal ("a ." -> "a.") would break exact decoding; no prefix space.

    Args:
        tokenizer: a tokenizer whose vocabulary contains ``<|endoftext|>``.
        out_dir: created if missing; existing files of the same names are overwritten.
        model_max_length: the model's context length, recorded for ``transformers`` users.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    added_tokens_decoder = {
        str(idx): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for idx, tok in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_tokens_decoder,
    }
    special_tokens_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special_tokens_map, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return out
