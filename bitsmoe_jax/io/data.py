"""Text data for the small reference MoE model: shipped corpora, tokenization and batching.

The reference model is trained on Shakespeare and evaluated on held-out plays, so the corpora
ship inside the package (``bitsmoe_jax/assets/data``, gzip-compressed; see ``PROVENANCE.md``
there) and nothing is ever downloaded at run time. This module turns those texts into token
streams and then into the two shapes the rest of the project consumes:

* :func:`strided_windows` -- the window plan for sliding-window perplexity, so that every token is
  scored once with as much left context as the evaluation length allows;
* :func:`training_batches` -- random ``[B, seq_len + 1]`` crops for next-token training.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

__all__ = [
    "ASSET_DATA_DIR",
    "SHIPPED_TEXTS",
    "SHIPPED_SHA256",
    "Window",
    "resolve_text",
    "read_text",
    "load_tokenizer",
    "tokenize_text",
    "strided_windows",
    "training_batches",
]

#: Folder holding the gzip-compressed corpora that ship with the package.
ASSETS_DIR: Path = Path(__file__).resolve().parents[1] / "assets"
ASSET_DATA_DIR: Path = ASSETS_DIR / "data"
# The shipped reference MoE (Mixtral architecture; made by `python -m reference_model.train`).
REFERENCE_DIR: Path = ASSETS_DIR / "reference_moe"

#: Short corpus names accepted by :func:`resolve_text` / :func:`read_text`, mapped to asset files.
#: The Shakespeare splits are by work (never inside a work), so ``shakespeare_test`` is genuinely
#: unseen text for the reference model; ``milton`` is an out-of-domain text for
#: calibration-versus-evaluation mismatch experiments.
SHIPPED_TEXTS: Mapping[str, Path] = MappingProxyType(
    {
        "shakespeare_train": ASSET_DATA_DIR / "shakespeare_train.txt.gz",
        "shakespeare_valid": ASSET_DATA_DIR / "shakespeare_valid.txt.gz",
        "shakespeare_test": ASSET_DATA_DIR / "shakespeare_test.txt.gz",
        "milton": ASSET_DATA_DIR / "milton_paradise_lost.txt.gz",
    }
)

#: SHA-256 of the *decompressed* UTF-8 bytes of each shipped text (also listed in PROVENANCE.md).
#: Recorded so that a tokenizer or a perplexity number can be tied to exact text, and so a test can
#: notice if an asset is ever replaced or corrupted.
SHIPPED_SHA256: Mapping[str, str] = MappingProxyType(
    {
        "shakespeare_train": "952c636b8947eedad8a057de44e7f4884bb750d32bdae95f4b9b0b553040ae90",
        "shakespeare_valid": "2402c795d69c74e22c0cf9a829af313196e74746878d5415969f9b487d6762c2",
        "shakespeare_test": "105d5a1efa69a05759033cb06c047f37e35f380e5d18b3625fcf6fa367b55217",
        "milton": "017f904a417a3cf3534fde361eb5e9ce001630e9801a734e823ffc20d7b98943",
    }
)


#: Train/valid/test splits of a shipped text, by name: (text, first, last fraction of its lines).
#: Milton's are for a second reference model trained the same way on different text
#: (`python -m reference_model.train --corpus milton`): Paradise Lost cut 90/5/5 by lines, in order,
#: so the test split (the end of Book XII) is text the model never saw.
TEXT_SPLITS: Mapping[str, tuple[str, float, float]] = MappingProxyType(
    {
        "milton_train": ("milton", 0.0, 0.9),
        "milton_valid": ("milton", 0.9, 0.95),
        "milton_test": ("milton", 0.95, 1.0),
    }
)


def resolve_text(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the file behind a shipped corpus name or a filesystem path.

    Short names (keys of :data:`SHIPPED_TEXTS`) take precedence, so scripts can say
    ``"shakespeare_test"`` without knowing where the package is installed. Anything else must be
    an existing ``.txt`` or ``.txt.gz`` file; other suffixes are refused because :func:`read_text`
    decides on decompression by suffix and silently reading a binary file as text would produce
    garbage perplexities rather than an error.

    Raises:
        FileNotFoundError: neither a known name nor an existing file; the message lists the names.
        ValueError: an existing file whose name does not end in ``.txt`` or ``.txt.gz``.
    """
    if isinstance(name_or_path, str) and name_or_path in TEXT_SPLITS:
        name_or_path = TEXT_SPLITS[name_or_path][0]  # a split: the file it is cut from
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_TEXTS:
        path = SHIPPED_TEXTS[name_or_path]
        if not path.is_file():
            raise FileNotFoundError(
                f"shipped text {name_or_path!r} should be at {path} but is missing; "
                "the package installation is incomplete (package data not installed?)"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        valid = ", ".join(repr(k) for k in (*SHIPPED_TEXTS, *TEXT_SPLITS))
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a shipped text name ({valid}) "
            "nor an existing .txt / .txt.gz file"
        )
    if not (path.name.endswith(".txt") or path.name.endswith(".txt.gz")):
        raise ValueError(f"{path} must be a .txt or .txt.gz file")
    return path


def read_text(name_or_path: str | os.PathLike[str]) -> str:
    """Read a shipped corpus or a ``.txt``/``.txt.gz`` file as UTF-8, gunzipping transparently.

    Decoding is strict: a wrongly encoded file should fail loudly, not be tokenized with
    replacement characters that no tokenizer saw in training. A split name (`TEXT_SPLITS`) reads
    its lines of the shipped text.
    """
    if isinstance(name_or_path, str) and name_or_path in TEXT_SPLITS:
        source, lo, hi = TEXT_SPLITS[name_or_path]
        lines = read_text(source).splitlines(keepends=True)
        return "".join(lines[int(lo * len(lines)) : int(hi * len(lines))])
    path = resolve_text(name_or_path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    else:
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def load_tokenizer(model_dir: str | os.PathLike[str]) -> tokenizers.Tokenizer:
    """Load ``model_dir/tokenizer.json`` with the ``tokenizers`` library (no ``transformers``).

    Only the fast-tokenizer JSON is needed: it fully determines the token ids, and using it
    directly keeps JAX evaluation free of the heavier ``transformers`` dependency.

    Raises:
        FileNotFoundError: naming the missing ``tokenizer.json`` path.
    """
    path = Path(model_dir).expanduser() / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (expected a tokenizer.json in {model_dir})"
        )
    return tokenizers.Tokenizer.from_file(str(path))


# A newline whose previous character is printable, non-space ASCII. For the GPT-2 style byte-level
# pre-tokenizer such a position is always a pre-token boundary (every pre-token containing "\n"
# consists of whitespace only, and the token before it ends in a non-space character), and the
# chunk that ends there ends in a non-space character, so the trailing-whitespace lookahead
# ``\s+(?!\S)`` never sees a different end of string. Cutting at a newline *followed* by text
# would be wrong: a chunk ending in "\n\n" pre-tokenizes to one "\n\n" piece, whereas inside the
# whole text the same run splits into "\n" + "\n". Restricting to ASCII keeps Python's and the
# Rust regex engine's ideas of "whitespace" from ever disagreeing at a cut.
_SAFE_CUT = re.compile(r"(?<=[!-~])\n")


def _can_chunk(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether cutting at :data:`_SAFE_CUT` provably leaves the token ids unchanged.

    True only for the plain byte-level BPE layout this project trains (and GPT-2-like tokenizers):
    no normalizer, a bare ``ByteLevel`` pre-tokenizer with its regex and without an added prefix
    space (which would be inserted at the start of every chunk), and added tokens that can neither
    straddle a cut nor reach across it by stripping whitespace. Anything else is encoded whole.
    """
    if tokenizer.normalizer is not None:
        return False
    pre = tokenizer.pre_tokenizer
    if not isinstance(pre, pre_tokenizers.ByteLevel):
        return False
    if pre.add_prefix_space or not pre.use_regex:
        return False
    for added in tokenizer.get_added_tokens_decoder().values():
        if added.lstrip or added.rstrip or added.single_word or "\n" in added.content:
            return False
    return True


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Split ``text`` at safe newline cuts into pieces of roughly ``chunk_chars`` characters."""
    cuts = [0]
    while True:
        match = _SAFE_CUT.search(text, cuts[-1] + chunk_chars)
        if match is None:
            break
        cuts.append(match.start())
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=False) if b > a]


def tokenize_text(
    tokenizer: tokenizers.Tokenizer, text: str, *, chunk_chars: int = 1 << 16
) -> np.ndarray:
    """Tokenize ``text`` as one continuous stream, without special tokens, to ``int32`` ids.

    The result always equals ``tokenizer.encode(text, add_special_tokens=False).ids``: the text
    is treated as one document (no per-line restarts, which would change merges across line
    breaks and inflate the token count). For the byte-level BPE tokenizers this project trains,
    the text is cut at newlines that are provably pre-token boundaries (see :data:`_SAFE_CUT`)
    and the pieces are encoded in parallel with ``encode_batch_fast``; on the 4.5 MB training
    split that took 2.1 s instead of 5.2 s for one ``encode`` call on a 2-core machine (and
    scales with cores). Other tokenizers are encoded in
    one call. Truncation or padding configured on ``tokenizer`` is ignored (a copy is used) since
    a corpus must never be silently cut to ``model_max_length``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        text: the whole corpus.
        chunk_chars: approximate characters per parallel piece (only affects speed).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    if not text:
        return np.zeros((0,), dtype=np.int32)
    if len(text) > chunk_chars and _can_chunk(tokenizer):
        pieces = _chunks(text, chunk_chars)
        encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = encode_batch(pieces, add_special_tokens=False)
        parts = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.int32)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


class Window(NamedTuple):
    """One sliding-window evaluation step; see :func:`strided_windows` for the convention."""

    start: int
    """First token position fed to the model (inclusive)."""
    end: int
    """One past the last token position fed to the model."""
    score_from: int
    """Smallest *target* position whose prediction is counted (targets are ``start+1 .. end-1``)."""


def strided_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Plan sliding-window ("strided") perplexity over a stream of ``n_tokens`` tokens.

    A model with context ``seq_len`` cannot see the whole stream, and chopping it into disjoint
    blocks gives the first tokens of every block almost no context. The usual remedy: slide a
    window of ``seq_len`` tokens by ``stride`` and count each target only once, in the first
    window that contains it with a prefix, so that with ``stride < seq_len`` every target after
    the first window keeps at least ``seq_len - stride`` tokens of left context.

    Convention (positions are 0-based indices into the token stream ``x[0..N-1]``):

    * Windows start at ``0, S, 2S, ...`` and span ``[start, end)`` with
      ``end = min(start + L, N)``.
    * A window predicts targets ``x[t]`` for ``t = start+1 .. end-1`` from ``x[start..t-1]``.
      Position 0 is never a target (it has no prefix).
    * It counts only targets ``t >= score_from`` where ``score_from = max(start + 1, prev_end)``
      and ``prev_end`` is the previous window's ``end`` (the first window counts all its targets).
    * Planning stops after the first window that reaches ``N``: a later window would have
      ``prev_end = N`` and count nothing. (Without that stop the windows would run on while
      ``start < N - 1``; the extra ones are pure wasted compute.)

    Worked example, ``N = 10, L = 4, S = 2``::

        Window(start=0, end=4,  score_from=1)   # targets 1,2,3
        Window(start=2, end=6,  score_from=4)   # targets 4,5   (context >= 2 tokens)
        Window(start=4, end=8,  score_from=6)   # targets 6,7
        Window(start=6, end=10, score_from=8)   # targets 8,9   -> reached N, stop

    Every position ``1..N-1`` is counted exactly once when ``S < L``. When ``S == L`` the windows
    are disjoint blocks and each block-start position ``kL`` (``k >= 1``) is never a target, since
    it is the first token of its window and the previous window does not include it; when
    ``S > L`` the positions ``start+L .. start+S`` between windows are also skipped, so the number
    of counted targets is ``sum(end - start - 1)`` over the windows. Callers divide the summed
    NLL by the number of counted targets, so these conventions stay well defined either way.

    Use in a loss: feed ``x[start:end]``; logits at in-window index ``i`` predict ``x[start+i+1]``;
    count the logits for ``i = score_from-start-1 .. end-start-2``.

    Args:
        n_tokens: stream length ``N`` (at least 2, so that there is a target).
        seq_len: window length ``L`` (at least 2).
        stride: step ``S`` between window starts (at least 1).
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score anything, got {n_tokens}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    windows: list[Window] = []
    prev_end = 0
    start = 0
    while start < n_tokens - 1:
        end = min(start + seq_len, n_tokens)
        windows.append(Window(start, end, max(start + 1, prev_end)))
        if end == n_tokens:
            break
        prev_end = end
        start += stride
    return windows


def training_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int
) -> Iterator[np.ndarray]:
    """Yield an endless stream of random ``int32 [batch_size, seq_len + 1]`` crops of ``tokens``.

    Each row is a contiguous slice ``tokens[s : s + seq_len + 1]`` with ``s`` uniform over every
    valid start, so inputs are ``row[:-1]`` and next-token targets ``row[1:]``. Random crops
    instead of a fixed chunking mean the model sees every offset of the text, and a numpy
    ``Generator`` seeded with ``seed`` makes the stream reproducible (same seed, same batches),
    which the reference-model training script relies on to be re-runnable bit for bit.
    Arguments are validated at call time, before the first batch is requested.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stream = np.asarray(tokens)
    if stream.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {stream.shape}")
    if not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {stream.dtype}")
    stream = stream.astype(np.int32, copy=False)
    n_starts = stream.shape[0] - seq_len  # starts 0 .. N - seq_len - 1 inclusive
    if n_starts < 1:
        raise ValueError(
            f"need more than seq_len={seq_len} tokens for a crop of {seq_len + 1}, got "
            f"{stream.shape[0]}"
        )
    return _random_crops(stream, seq_len, batch_size, n_starts, seed)


def _random_crops(
    stream: np.ndarray, seq_len: int, batch_size: int, n_starts: int, seed: int
) -> Iterator[np.ndarray]:
    """The generator behind :func:`training_batches` (split out so arguments are checked
    eagerly)."""
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1, dtype=np.int64)
    while True:
        starts = rng.integers(0, n_starts, size=batch_size, dtype=np.int64)
        yield stream[starts[:, None] + offsets[None, :]]
