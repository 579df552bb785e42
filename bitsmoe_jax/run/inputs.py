"""Token inputs of a run: calibration windows and the evaluation text with its reference model."""

from __future__ import annotations

import warnings
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
    ids = tokenize_text(run_tokenizer(model_path, tokenizer), read_text(text))
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
    ids = tokenize_text(run_tokenizer(run.model_path, run.tokenizer), read_text(run.eval_text))
    return (ids[: int(run.eval_max_tokens)] if run.eval_max_tokens else ids), load_model(
        run.model_path
    )[0]
