"""lm-evaluation-harness on our models: `python -m bitsmoe_jax.lm_eval --model_args path=DIR
--tasks TASKS [any lm-eval option]`.

Registers the lm-eval model ``bitsmoe`` (this module's `BitsMoELM`): an original (Hugging Face,
converted) or quantized directory, run by our Flax model under `jax.jit`, so downstream accuracy is
measured on exactly what `quantize` wrote. The command line is lm-eval's own (`lm-eval run`) with
``--model bitsmoe`` filled in; every other option is forwarded unchanged.

``--model_args`` (comma-separated ``key=value``): ``path`` (required), ``tokenizer`` (a directory
with tokenizer.json; default the model's), ``dtype`` (float32 | bfloat16, default float32),
``max_length`` (context length; default the config's ``max_position_embeddings``),
``max_gen_toks`` (default 256). ``--batch_size`` is honoured (default 8; ``auto`` means 8).

The three request types follow the `hf` backend's conventions, so the numbers compare with it:
contexts are encoded without special tokens, an empty context is conditioned on the BOS token (or
EOS), too-long inputs are cut from the left, rolling log-likelihoods use lm-eval's disjoint windows
of ``max_length``, and generation is greedy unless ``do_sample`` / ``temperature`` ask otherwise,
stops at EOS and is cut at the first ``until`` string. Needs the extra: ``pip install
'bitsmoe-jax[eval]'``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models, registered before ours)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bitsmoe_jax.lm_eval needs lm-evaluation-harness: pip install 'bitsmoe-jax[eval]'"
    ) from e

from bitsmoe_jax.evaluate import COMPUTE_DTYPES
from bitsmoe_jax.inference import generate, jit_logits
from bitsmoe_jax.io.data import load_tokenizer
from bitsmoe_jax.loading import load_model

LENGTH_BUCKET = 32  # inputs are padded to a multiple of this: few shapes, few compilations


def _bucket(n: int, cap: int) -> int:
    return min(cap, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)


@register_model("bitsmoe")
class BitsMoELM(TemplateLM):
    """An lm-eval model backed by a bitsmoe-jax model directory (see the module docstring)."""

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str = 8,
        **unused: Any,  # lm-eval passes device, max_batch_size, ...: they do not apply here
    ) -> None:
        super().__init__()
        model_dir = Path(path).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {sorted(COMPUTE_DTYPES)}")
        self.tokenizer = load_tokenizer(tokenizer or model_dir)
        self.model, self.config = load_model(model_dir, dtype=COMPUTE_DTYPES[dtype])
        self._logits = jit_logits(self.model)
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = 8 if str(batch_size).startswith("auto") else max(1, int(batch_size))
        eos = self.config.eos_token_id
        if eos is None:
            raise ValueError(f"{model_dir}: config.json has no eos_token_id (lm-eval needs one)")
        self._eos = int(eos)
        bos = self.config.bos_token_id
        self._prefix = int(bos) if bos is not None else self._eos

    # ------------------------------------------------------------------ what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return "tokenizer.json"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------------- scoring
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p of the last `n` tokens of `ids`, whether each was the argmax) for each
        (ids, n), in batches of equal padded length (right padding: causal attention keeps the
        scored positions exact)."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = _bucket(max(len(rows[i][0]) for i in idx) - 1, self._max_length)
            batch = np.full((self.batch_size, width), self._eos, np.int32)
            for r, i in enumerate(idx):
                inp = rows[i][0][:-1]
                batch[r, : len(inp)] = inp
            # log-softmax on device in float32, as `evaluate` computes it; sums in float64
            logits = jnp.asarray(self._logits(jnp.asarray(batch)), jnp.float32)
            logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
            for r, i in enumerate(idx):
                ids, n = rows[i]
                pos = np.arange(len(ids) - 1 - n, len(ids) - 1)
                lp = logp[r, pos]
                target = np.asarray(ids[-n:])
                out[i] = (
                    float(lp[np.arange(n), target].sum()),
                    bool((lp.argmax(-1) == target).all()),
                )
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            whole = (context + continuation)[-(self._max_length + 1) :]
            rows.append((whole, len(continuation)))
        results = self._score(rows)
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[k] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self._eos], skip_special_tokens=False)
        results = []
        for context, gen_kwargs in (req.args for req in requests):
            opts = dict(gen_kwargs or {})
            until = opts.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(
                next(
                    (
                        opts.pop(k)
                        for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                        if k in opts
                    ),
                    self._max_gen_toks,
                )
            )
            temperature = float(opts.pop("temperature", 0.0) or 0.0)
            if not opts.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = self.tok_encode(context)[-max(1, self._max_length - max_new) :]
            new = generate(
                self.model,
                jnp.asarray([ids], jnp.int32),
                max_new,
                temperature=temperature,
                top_p=float(opts.pop("top_p", 1.0) or 1.0),
                top_k=int(opts.pop("top_k", 0) or 0),
                seed=int(opts.pop("seed", 0) or 0),
                eos_token_id=self._eos,
            )
            toks = [int(t) for t in np.asarray(new[0])]
            if self._eos in toks:
                toks = toks[: toks.index(self._eos)]
            text = self.tok_decode(toks)
            cuts = [text.index(s) for s in until if s and s in text]
            text = text[: min(cuts)] if cuts else text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line with ``--model bitsmoe``; the rest of `argv` is forwarded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        print(
            "error: --model is set by this command (bitsmoe); give the directory as "
            "--model_args path=DIR",
            file=sys.stderr,
        )
        return 2
    if not any(a in ("-h", "--help") for a in argv) and not any(
        a == "--model_args" or a.startswith("--model_args=") for a in argv
    ):
        print("error: --model_args path=DIR is required (the model directory)", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", "run", "--model", "bitsmoe", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
