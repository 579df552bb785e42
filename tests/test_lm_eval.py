"""The lm-eval adapter (`bitsmoe_jax.lm_eval`) against lm-eval's own `hf` backend (PyTorch,
transformers) on the same unquantized model, on local tasks built here from the shipped Shakespeare
test text (JSON files, no downloads), one per request type:

- multiple choice (loglikelihood): the real next line against shuffled ones — accuracy equal
  within 0.01, and every choice's log-likelihood within 1e-3;
- rolling log-likelihood: word perplexity equal to 1e-4 relative;
- generate_until (greedy, stop at a newline): the same generated text for every prompt.

Then the command line (`python -m bitsmoe_jax.lm_eval`, in process) writes lm-eval's results file,
and a quantized directory runs through the same adapter.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from bitsmoe_jax import lm_eval as adapter  # noqa: E402  (registers the "bitsmoe" model)
from bitsmoe_jax.io.data import REFERENCE_DIR, read_text  # noqa: E402

MC, ROLLING, GENERATE = "bitsmoe_test_mc", "bitsmoe_test_rolling", "bitsmoe_test_generate"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task(path: Path, name: str, data: Path, body: str) -> None:
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    lines = [ln for ln in read_text("shakespeare_test").splitlines() if len(ln.strip()) > 25]
    rng = random.Random(0)
    picks = rng.sample(range(len(lines) - 6), 40)
    mc = []
    for i in picks:
        true = lines[i + 1].split()
        shuffled = true[:]
        rng.shuffle(shuffled)
        other = rng.choice(lines).split()
        other_shuffled = other[:]
        rng.shuffle(other_shuffled)
        choices = [" " + " ".join(w) for w in (true, shuffled, other, other_shuffled)]
        order = list(range(4))
        rng.shuffle(order)
        mc.append(
            {
                "context": lines[i],
                "choices": [choices[j] for j in order],
                "label": order.index(0),
            }
        )
    _jsonl(d / "mc.jsonl", mc)
    _jsonl(d / "rolling.jsonl", [{"text": "\n".join(lines[i : i + 6])} for i in picks[:10]])
    _jsonl(d / "generate.jsonl", [{"prompt": lines[i], "target": lines[i + 1]} for i in picks[:8]])
    _task(
        d / "mc.yaml",
        MC,
        d / "mc.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'
        "  - metric: acc_norm\n",
    )
    _task(
        d / "rolling.yaml",
        ROLLING,
        d / "rolling.jsonl",
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    )
    _task(
        d / "generate.yaml",
        GENERATE,
        d / "generate.jsonl",
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )
    return d


@pytest.fixture(scope="module", autouse=True)
def offline():
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _evaluate(model: str, model_args: str, tasks: Path, batch_size: int, names=None) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=names or [MC, ROLLING, GENERATE],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
    )


@pytest.fixture(scope="module")
def reference(tasks) -> dict:
    """lm-eval's `hf` backend (batch 1: no padding in its generation)."""
    return _evaluate("hf", f"pretrained={REFERENCE_DIR},dtype=float32", tasks, 1)


@pytest.fixture(scope="module")
def ours(tasks) -> dict:
    return _evaluate("bitsmoe", f"path={REFERENCE_DIR}", tasks, 8)


def _choice_logprobs(result: dict) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in result["samples"][MC]}


def test_multiple_choice_matches_the_hf_backend(ours, reference):
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(ours["results"][MC][metric] - reference["results"][MC][metric]) <= 0.01
    mine, theirs = _choice_logprobs(ours), _choice_logprobs(reference)
    assert sorted(mine) == sorted(theirs) == list(range(40))
    for doc in mine:
        assert mine[doc] == pytest.approx(theirs[doc], abs=1e-3), doc
    assert ours["results"][MC]["acc,none"] > 0.25  # better than chance: the model reads the text


def test_rolling_loglikelihood_matches_the_hf_backend(ours, reference):
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][ROLLING][metric] == pytest.approx(
            reference["results"][ROLLING][metric], rel=1e-4
        )


def test_generation_matches_the_hf_backend(ours, reference):
    def texts(result):
        return {s["doc_id"]: s["filtered_resps"][0] for s in result["samples"][GENERATE]}

    mine, theirs = texts(ours), texts(reference)
    assert mine == theirs
    assert any(t.strip() for t in mine.values())  # something was generated
    assert all("\n" not in t for t in mine.values())  # cut at the stop sequence


def test_command_line_forwards_lm_evals_options(tasks, tmp_path, ours):
    out = tmp_path / "results"
    argv = [
        "--model_args",
        f"path={REFERENCE_DIR}",
        "--tasks",
        MC,
        "--include_path",
        str(tasks),
        "--output_path",
        str(out),
        "--batch_size",
        "4",
    ]
    assert adapter.main(argv) == 0
    (results_file,) = out.rglob("results_*.json")
    written = json.loads(results_file.read_text())
    assert written["results"][MC]["acc,none"] == ours["results"][MC]["acc,none"]
    assert written["config"]["model"] == "bitsmoe"


def test_command_line_refuses_a_model_and_needs_a_path(capsys):
    assert adapter.main(["--model", "hf", "--model_args", "pretrained=x", "--tasks", MC]) == 2
    assert adapter.main(["--tasks", MC]) == 2
    err = capsys.readouterr().err
    assert "--model is set by this command" in err and "path=DIR is required" in err


def test_a_quantized_directory_runs_through_the_adapter(tasks, tmp_path, ours):
    import bitsmoe_jax

    out = tmp_path / "q"
    bitsmoe_jax.quantize_checkpoint(
        REFERENCE_DIR,
        out,
        3.0,
        progress=False,
        num_calib_tokens=1024,
        seq_len=128,
        eval_text="",
        # what is tested is the adapter on a written directory, not the method's settings: the
        # one-pass per-layer budget and no scale fit keep the run short
        budget_scope="layer",
        scale_tuning_steps=0,
    )
    quantized = _evaluate("bitsmoe", f"path={out}", tasks, 8, [MC])
    q, fp = _choice_logprobs(quantized), _choice_logprobs(ours)
    diffs = [abs(a - b) for d in q for a, b in zip(q[d], fp[d], strict=True)]
    assert max(diffs) > 0  # the quantized model ran, not the original
    assert sum(diffs) / len(diffs) < 0.05 * sum(abs(v) for d in fp for v in fp[d]) / len(diffs)
