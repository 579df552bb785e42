"""Token inputs of a run: calibration windows and the evaluation text with its reference model."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text
from bitsmoe_jax.loading import load_model
from bitsmoe_jax.run.config_schema import RunConfig


def calibration_tokens(
    model_path: str, text: str, num_tokens: int, seq_len: int, tokenizer: str = ""
) -> np.ndarray:
    """[n, seq_len] windows spread evenly over the calibration text (deterministic), tokenized with
    `tokenizer`'s tokenizer.json (default: the model's)."""
    ids = token_ids(model_path, text, tokenizer)
    n = max(1, num_tokens // seq_len)
    if len(ids) < seq_len:
        raise ValueError(
            f"calibration text {text!r} has {len(ids)} tokens, fewer than seq_len={seq_len}"
        )
    if n * seq_len > len(ids):
        warnings.warn(
            f"calibration text {text!r} has {len(ids)} tokens but {n * seq_len} were asked for "
            f"({n} windows of {seq_len}): the windows overlap and each token is used "
            f"{n * seq_len / len(ids):.1f} times on average; give a longer text or lower "
            "num_calib_tokens",
            CalibrationReuseWarning,
            stacklevel=2,
        )
    starts = np.linspace(0, len(ids) - seq_len, n).astype(np.int64)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32)


#: texts tokenized in this process, most recent last: {(tokenizer.json, its mtime and size, the
#: text): ids}
_TOKENIZED: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
_TOKENIZED_KEEP = 4


def token_ids(model_path: str, text: str, tokenizer: str = "") -> np.ndarray:
    """int32 ids of the text `text` names (`read_text`) under the run's tokenizer (`run_tokenizer`).

    Remembered for the process's later calls with the same tokenizer file (path, mtime, size) and
    the same text (compared whole, not by a hash): a run tokenizes its calibration text once per
    pass and its evaluation text once more, and a process that runs several quantizations (a
    sweep, the Python API, the test suite) repeats them all. Each costs 1.5 s for the shipped
    texts on 2 cores and grows with the corpus. The caller gets its own copy."""
    raw = read_text(text)
    path = Path(tokenizer or model_path).expanduser() / "tokenizer.json"
    try:
        st = path.stat()
    except OSError:  # run_tokenizer says what is missing
        return tokenize_text(run_tokenizer(model_path, tokenizer), raw)
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, raw)
    if key not in _TOKENIZED:
        _TOKENIZED[key] = tokenize_text(run_tokenizer(model_path, tokenizer), raw)
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    _TOKENIZED.move_to_end(key)
    return _TOKENIZED[key].copy()


def run_tokenizer(model_path: str, tokenizer: str = ""):
    """The tokenizer of a run: `tokenizer`'s tokenizer.json when set, else the model's; a model
    without one is told about the field."""
    if tokenizer:
        return load_tokenizer(tokenizer)
    try:
        return load_tokenizer(model_path)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; set --config.tokenizer=DIR to a directory with the model's tokenizer.json"
        ) from None


class CalibrationReuseWarning(UserWarning):
    """The calibration text is shorter than the tokens asked for: tokens are reused."""


def evaluation_inputs(run: RunConfig) -> tuple[np.ndarray, Any]:
    """(token ids of `run.eval_text`, cut to `eval_max_tokens`; the unquantized reference model)."""
    ids = token_ids(run.model_path, run.eval_text, run.tokenizer)
    return (ids[: int(run.eval_max_tokens)] if run.eval_max_tokens else ids), load_model(
        run.model_path
    )[0]
