"""Strided perplexity, and divergence from a reference model: `python -m bitsmoe_jax.evaluate`.

The measuring stick for every later result (quantized checkpoints included)::

    python -m bitsmoe_jax.evaluate --model PATH --text FILE --seq-len 256 --stride 256 \\
        [--reference PATH] [--batch-size N] [--tokenizer DIR] --json OUT.json

* ``PATH`` is anything :func:`bitsmoe_jax.loading.load_model` accepts (a Hugging Face directory, a
  converted checkpoint, a quantized checkpoint); ``FILE`` is a ``.txt``/``.txt.gz`` path or a
  shipped corpus name (``shakespeare_test``, ``milton``, ...; see
  :func:`bitsmoe_jax.io.data.resolve_text`).
* The whole text is tokenized once with the model directory's ``tokenizer.json`` (or
  ``--tokenizer DIR``), without special tokens, and cut into windows by
  :func:`bitsmoe_jax.io.data.strided_windows`: windows start at ``0, S, 2S, ...``; each counts only
  the
  targets after the previous window's end, so every target is scored once, with at least
  ``seq_len - stride`` tokens of left context after the first window.
* Windows are batched (``[batch_size, seq_len]``, one jit compile per model and shape). The last,
  shorter window is padded on the right and unused batch rows are padding too; a causal model never
  lets a later position influence an earlier one, and MoE routing is per token with no capacity
  limit, so padding changes no scored logit, and padded positions are never scored.
* With ``--reference``, the reference runs on the same batches in the same pass and the report adds
  ``kl_divergence`` (mean over scored targets of KL(reference || model) in nats, from float32
  log-softmax of both), ``top1_agreement`` (fraction of scored positions whose argmax agrees) and
  ``reference_perplexity``. The reference's logits are never kept beyond one batch.

Library API (used by the quantizer)::

    evaluate_model(model, tokens, seq_len, stride, batch_size=8, reference=None) -> dict
    evaluate_paths(model_path, text, seq_len, stride, ...) -> dict   # what the CLI runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.io import data
from bitsmoe_jax.loading import checkpoint_kind, load_model

__all__ = [
    "EvaluationInputError",
    "evaluate_model",
    "evaluate_paths",
    "summary_line",
    "write_json_atomic",
    "main",
]

# compute dtypes the command-line tools (evaluate, generate) offer
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class EvaluationInputError(Exception):
    """A missing or unusable input (model directory, text, tokenizer); the CLI exits with status
    2."""


# ------------------------------------------------------------------------------------ batch
# statistics
@jax.jit
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [B, T, V], targets [B, T] -> NLL [B, T] (float32, from float32 log-softmax)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@jax.jit
def _token_stats_with_reference(
    logits: jax.Array, ref_logits: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-position NLL of the model and of the reference, KL(reference || model), argmax agreement.

    All [B, T], float32 (agreement bool). KL = sum_v p_ref (log p_ref - log p_model).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    idx = targets[..., None]
    nll = -jnp.take_along_axis(logp, idx, axis=-1)[..., 0]
    ref_nll = -jnp.take_along_axis(ref_logp, idx, axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = jnp.argmax(logits, axis=-1) == jnp.argmax(ref_logits, axis=-1)
    return nll, ref_nll, kl, agree


def _window_batches(tokens: np.ndarray, windows: Sequence[data.Window], seq_len: int, batch: int):
    """Yield (ids [batch, seq_len], targets [batch, seq_len], mask [batch, seq_len],
    n_real_windows).

    Row r holds window w's tokens ``x[w.start:w.end]`` followed by zero padding; column i predicts
    ``x[w.start + i + 1]`` and is scored iff that target lies in ``[w.score_from, w.end)``.
    """
    cols = np.arange(seq_len)
    for first in range(0, len(windows), batch):
        chunk = windows[first : first + batch]
        ids = np.zeros((batch, seq_len), np.int32)
        targets = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), bool)
        for r, w in enumerate(chunk):
            n = w.end - w.start
            ids[r, :n] = tokens[w.start : w.end]
            targets[r, : n - 1] = tokens[w.start + 1 : w.end]
            target_pos = w.start + 1 + cols
            mask[r] = (target_pos >= w.score_from) & (target_pos < w.end)
        yield ids, targets, mask, len(chunk)


def evaluate_model(
    model: Any,
    tokens: Any,
    seq_len: int,
    stride: int,
    batch_size: int = 8,
    reference: Any | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Strided perplexity of ``model`` on the token stream ``tokens`` (and divergence from
    ``reference``).

    Args:
        model: a model with the ``model(input_ids [B, T]) -> logits [B, T, V]`` contract (dense or
            quantized NNX module).
        tokens: 1-D integer token ids (the whole text, tokenized once, no special tokens). seq_len,
        stride: the window plan of :func:`bitsmoe_jax.io.data.strided_windows`. batch_size: windows
        per
        forward pass (reduced to the number of windows when there are fewer). reference: another
        model over the same tokenizer, run on the same batches in the same pass. progress: show a
        tqdm bar over windows on stderr.

    Returns:
        ``perplexity`` (exp of the mean NLL), ``nll_sum`` (nats), ``tokens_scored``, ``seq_len``,
        ``stride``, ``num_windows``, ``batch_size``, ``time_s`` (wall time of the forward passes,
        compiles included); with a reference also ``kl_divergence`` (mean KL(reference || model),
        nats), ``top1_agreement``, ``reference_perplexity`` and ``reference_nll_sum``.
    """
    toks = np.asarray(tokens)
    if toks.ndim != 1 or not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(
            f"tokens must be a 1-D integer array, got shape {toks.shape} dtype {toks.dtype}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    toks = toks.astype(np.int32, copy=False)
    windows = data.strided_windows(int(toks.shape[0]), seq_len, stride)
    if toks.size and int(toks.min()) < 0:
        raise ValueError("token ids must be non-negative")
    for name, m in (("model", model), ("reference", reference)):
        vocab = getattr(getattr(m, "config", None), "vocab_size", None)
        if vocab is not None and toks.size and int(toks.max()) >= vocab:
            raise ValueError(
                f"token id {int(toks.max())} is outside the {name}'s vocabulary of {vocab}"
            )

    batch = min(batch_size, len(windows))
    logits_fn = jit_logits(model)
    ref_fn = None if reference is None else jit_logits(reference)

    nll_sum = 0.0
    ref_nll_sum = 0.0
    kl_sum = 0.0
    agree_sum = 0
    scored = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(windows), desc="evaluate", unit="win", file=sys.stderr, disable=not progress
    )
    try:
        for ids, targets, mask, n_real in _window_batches(toks, windows, seq_len, batch):
            logits = logits_fn(ids)
            tgt = jnp.asarray(targets)
            if ref_fn is None:
                nll = _token_nll(logits, tgt)
                nll_sum += float(np.asarray(nll, np.float64)[mask].sum())
            else:
                ref_logits = ref_fn(ids)
                if ref_logits.shape[-1] != logits.shape[-1]:
                    raise ValueError(
                        f"reference vocabulary {ref_logits.shape[-1]} differs from the model's "
                        f"{logits.shape[-1]}"
                    )
                nll, ref_nll, kl, agree = _token_stats_with_reference(logits, ref_logits, tgt)
                nll_sum += float(np.asarray(nll, np.float64)[mask].sum())
                ref_nll_sum += float(np.asarray(ref_nll, np.float64)[mask].sum())
                kl_sum += float(np.asarray(kl, np.float64)[mask].sum())
                agree_sum += int(np.asarray(agree)[mask].sum())
            scored += int(mask.sum())
            bar.update(n_real)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    result: dict[str, Any] = {
        "perplexity": math.exp(nll_sum / scored),
        "nll_sum": nll_sum,
        "tokens_scored": scored,
        "seq_len": seq_len,
        "stride": stride,
        "num_windows": len(windows),
        "batch_size": batch,
        "time_s": elapsed,
    }
    if reference is not None:
        result.update(
            kl_divergence=kl_sum / scored,
            top1_agreement=agree_sum / scored,
            reference_perplexity=math.exp(ref_nll_sum / scored),
            reference_nll_sum=ref_nll_sum,
        )
    return result


# ------------------------------------------------------------------------------------------- paths
def _check_model_dir(path: str | os.PathLike[str], what: str) -> Path:

    p = Path(path).expanduser()
    if not p.is_dir():
        raise EvaluationInputError(f"{what} directory not found: {p}")
    try:
        checkpoint_kind(p)
    except FileNotFoundError as err:
        raise EvaluationInputError(f"{what}: {err}") from None
    return p


def _load_tokenizer(directory: Path, what: str):
    try:
        return data.load_tokenizer(directory)
    except FileNotFoundError as err:
        raise EvaluationInputError(
            f"{what}: {err}; pass --tokenizer DIR to use another tokenizer.json"
        ) from None


def evaluate_paths(
    model_path: str | os.PathLike[str],
    text: str | os.PathLike[str],
    seq_len: int,
    stride: int,
    *,
    batch_size: int = 8,
    reference_path: str | os.PathLike[str] | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: Any = jnp.float32,
    progress: bool = True,
) -> dict[str, Any]:
    """Load the model (and reference), tokenize ``text`` once, and run :func:`evaluate_model`.

    Inputs are all checked before anything heavy is loaded; a missing model directory, text or
    tokenizer raises :class:`EvaluationInputError` with one clear message. The tokenizer is the
    model directory's ``tokenizer.json`` unless ``tokenizer_dir`` is given; a reference directory
    with a ``tokenizer.json`` whose vocabulary differs from it is refused (the comparison would
    be meaningless). The result adds ``model``, ``text``, ``text_path``, ``reference``,
    ``tokens_total``, ``load_time_s`` and ``total_time_s`` to :func:`evaluate_model`'s keys.
    """
    t0 = time.perf_counter()
    model_dir = _check_model_dir(model_path, "model")
    ref_dir = (
        None if reference_path is None else _check_model_dir(reference_path, "reference model")
    )
    try:
        text_path = data.resolve_text(text)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluationInputError(f"text: {err}") from None
    if tokenizer_dir is not None:
        tok_dir = Path(tokenizer_dir).expanduser()
        tokenizer = _load_tokenizer(tok_dir, "--tokenizer")
    else:
        tokenizer = _load_tokenizer(model_dir, "model")
        if ref_dir is not None and (ref_dir / "tokenizer.json").is_file():
            if data.load_tokenizer(ref_dir).get_vocab() != tokenizer.get_vocab():
                raise EvaluationInputError(
                    f"the reference {ref_dir} and the model {model_dir} have different tokenizers"
                )

    try:
        raw_text = data.read_text(text)
    except ValueError as err:  # not UTF-8: the message names the file and the byte
        raise EvaluationInputError(f"text: {err}") from None
    tokens = data.tokenize_text(tokenizer, raw_text)
    if tokens.shape[0] < 2:
        raise EvaluationInputError(
            f"text {text_path} has {tokens.shape[0]} token(s); need at least 2"
        )
    model, _ = load_model(model_dir, dtype=dtype)
    reference = None if ref_dir is None else load_model(ref_dir, dtype=dtype)[0]
    load_time = time.perf_counter() - t0

    result = evaluate_model(
        model, tokens, seq_len, stride, batch_size, reference, progress=progress
    )
    result.update(
        model=str(model_path),
        text=str(text),
        text_path=str(text_path),
        reference=None if reference_path is None else str(reference_path),
        tokens_total=int(tokens.shape[0]),
        dtype=jnp.dtype(dtype).name,
        load_time_s=load_time,
        total_time_s=time.perf_counter() - t0,
    )
    return result


def summary_line(result: dict[str, Any]) -> str:
    """One human-readable line, e.g. ``perplexity 123.45 over 95,000 tokens (seq 256, stride 256) |
    12.3 s``."""
    parts = [
        f"perplexity {result['perplexity']:.2f} over {result['tokens_scored']:,} tokens "
        f"(seq {result['seq_len']}, stride {result['stride']})"
    ]
    if "kl_divergence" in result:
        parts.append(f"KL {result['kl_divergence']:.4f} nats")
        parts.append(f"top-1 {100 * result['top1_agreement']:.1f}%")
        parts.append(f"reference perplexity {result['reference_perplexity']:.2f}")
    parts.append(f"{result['time_s']:.1f} s")
    return " | ".join(parts)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and
    ``os.replace``."""
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------- CLI
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bitsmoe_jax.evaluate",
        description="Strided perplexity of a model on a text, optionally with KL / top-1 agreement "
        "against a reference model.",
    )
    p.add_argument("--model", required=True, help="HF, converted or quantized model directory")
    p.add_argument(
        "--text",
        required=True,
        help="a .txt/.txt.gz file or a shipped name (shakespeare_test, milton, ...)",
    )
    p.add_argument("--seq-len", type=_positive_int, default=256, help="window length (default 256)")
    p.add_argument(
        "--stride", type=_positive_int, default=None, help="step between windows (default: seq-len)"
    )
    p.add_argument("--reference", default=None, help="reference model directory (same tokenizer)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(COMPUTE_DTYPES),
        default="float32",
        help="compute dtype (default float32)",
    )
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seq_len < 2:
        print("error: --seq-len must be at least 2", file=sys.stderr)
        return 2
    stride = args.seq_len if args.stride is None else args.stride
    try:
        result = evaluate_paths(
            args.model,
            args.text,
            args.seq_len,
            stride,
            batch_size=args.batch_size,
            reference_path=args.reference,
            tokenizer_dir=args.tokenizer,
            dtype=COMPUTE_DTYPES[args.dtype],
            progress=not args.no_progress,
        )
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        write_json_atomic(args.json, result)
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
