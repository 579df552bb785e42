"""A run's token ids are remembered within the process: the same ids as tokenizing afresh, a
private copy for each caller, and forgotten when the tokenizer file or the text changes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import tokenizers

from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.run import inputs


def _fresh(tokenizer_dir, text: str) -> np.ndarray:
    """The ids straight from the tokenizers library, one `encode` of the whole text."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)


def test_remembered_ids_equal_fresh_ones_and_follow_the_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(REFERENCE_DIR / "tokenizer.json", model / "tokenizer.json")
    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be: that is the question.\nWhether 'tis nobler\n" * 50)

    first = inputs.token_ids(str(model), str(text))
    np.testing.assert_array_equal(first, _fresh(model, text.read_text()))
    first[:] = -1  # the caller's copy: the next caller must not see this
    again = inputs.token_ids(str(model), str(text))
    np.testing.assert_array_equal(again, _fresh(model, text.read_text()))

    text.write_text("Now is the winter of our discontent\n" * 40)  # same path, other text
    np.testing.assert_array_equal(
        inputs.token_ids(str(model), str(text)), _fresh(model, text.read_text())
    )

    # the same path holding another tokenizer (a vocabulary without merges: one id per byte)
    vocab = {chr(i): i for i in range(33, 127)} | {"Ġ": 127, "Ċ": 128}
    other = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    other.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.save(str(model / "tokenizer.json"))
    st = os.stat(model / "tokenizer.json")
    os.utime(model / "tokenizer.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = inputs.token_ids(str(model), str(text))
    np.testing.assert_array_equal(got, _fresh(model, text.read_text()))
    assert len(got) == len(text.read_bytes())  # one id per byte: not the trained merges' ids
