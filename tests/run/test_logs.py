"""What a run prints: a line before each slow step, no solver banner, per-budget times that add up
to the run's wall time, and (on a terminal) log lines, warnings and errors never glued to the
progress bar."""

from __future__ import annotations

import io
import re
import sys
import time
import warnings

import numpy as np

from bitsmoe_jax import quantize
from bitsmoe_jax.io.data import REFERENCE_DIR
from bitsmoe_jax.method.allocate import solve_milp
from bitsmoe_jax.parallel import distributed
from bitsmoe_jax.run.evaluation import run_time_line
from bitsmoe_jax.run.progress import LayerProgress
from tests.run.tiny_mixtral import TINY_CONFIG


def test_a_run_says_what_it_does_and_its_times_add_up(tmp_path, capfd):
    """The shipped model at two budgets, MILP allocation (HiGHS), output to a pipe (no terminal)."""
    argv = [
        "--config",
        TINY_CONFIG,
        f"--config.model_path={REFERENCE_DIR}",
        f"--config.output_dir={tmp_path / 'out'}",
        "--config.budget_bits=(2.0,3.0)",
        "--config.num_calib_tokens=1024",
        "--config.seq_len=128",
        "--config.eval_max_tokens=1024",
        "--config.allocator=milp",
        "--config.rank=32",  # 1536 units a layer: HiGHS solves each in well under a second
    ]
    t0 = time.time()
    assert quantize.main(argv) == 0
    wall = time.time() - t0
    out, err = capfd.readouterr()
    text = out + err
    assert "HiGHS" not in text and "Copyright" not in text  # the solver's banner is kept out
    assert "\r" not in text  # not a terminal: plain lines, no bar redraws
    lines = out.splitlines()
    expected_order = [
        "pre-flight check:",
        "whole-model budget (budget_scope='model'): pass 1 of 2",
        "memory plan:",
        "pass 1 of 2 (loss tables): layer 1/3 done",
        "pass 1 of 2 (loss tables): layer 3/3 done",
        "pass 2 of 2 (quantize): layer 1/3 done",
        "pass 2 of 2 (quantize): layer 3/3 done",
        "budget 2.00: writing",
        "budget 2.00: evaluating",
        "budget 3.00: writing",  # the later budget's allocation and packing happen here
        "budget 3.00: evaluating",
        "2.00 bpw budget",
        "3.00 bpw budget",
        "done in ",
    ]
    found = [next(i for i, ln in enumerate(lines) if ln.startswith(p)) for p in expected_order]
    assert found == sorted(found), lines
    assert "allocating and packing" in lines[found[9]]
    # done in W s: shared S s + budgets A + B s + start-up R s — the parts sum to W, W <= wall
    done = lines[found[-1]]
    numbers = [float(x) for x in re.findall(r"(\d+\.\d) s", done.replace(" + ", " s + "))]
    total, parts = numbers[0], numbers[1:]
    assert len(parts) == 4, done  # shared, two budgets, start-up
    assert abs(sum(parts) - total) <= 0.25 and total <= wall + 0.1, done


def test_time_line_of_a_resumed_run():
    reports = [{"time_s": {"total": 30.0, "shared": 20.0, "budget": 10.0}}]
    assert run_time_line(reports, 12.0) == (
        "done in 12.0 s: shared quantization 20.0 s + budget 10.0 s + the rest by an earlier run "
        "this one resumed"
    )
    old = [{"time_s": {"total": 7.0}}]  # a report written before budgets had their own time
    assert run_time_line(old, 8.0) == "done in 8.0 s: budget 7.0 s + start-up and checks 1.0 s"


def test_no_solver_banner_and_other_output_kept(capfd):
    rng = np.random.default_rng(0)
    loss = np.sort(rng.random((40, 4)), axis=1)[:, ::-1].copy()
    cost = np.tile(np.arange(4.0), (40, 1))
    print("before", flush=True)
    alloc = solve_milp(loss, cost, 60.0)
    print("after", flush=True)
    assert alloc.solver.startswith("milp-highs")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and err == ""


def _starts_a_line(text: str, needle: str) -> bool:
    i = text.index(needle)
    return i == 0 or text[i - 1] in "\r\n"


def test_lines_never_glue_to_the_bar(monkeypatch):
    """A terminal shows stdout and stderr on one screen: both are one buffer here. Log lines,
    warnings and the error printed after the run stops each start on a line of their own."""
    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    bar = LayerProgress(3, tty=True)
    try:
        bar.layer_done(0, 1.0, {"forward": 1.0})
        distributed.log("a log line while the bar is drawn")
        # what `warnings.warn` calls to show a warning (pytest records them instead)
        warnings.showwarning(
            UserWarning("a warning while the bar is drawn"), UserWarning, "w.py", 1
        )
        raise RuntimeError("boom")
    except RuntimeError:
        pass
    finally:
        bar.close()
    print("error: boom", file=sys.stderr)
    text = screen.getvalue()
    assert "quantize" in text  # the bar was drawn
    for needle in ("a log line while", "w.py:1: UserWarning", "error: boom"):
        assert _starts_a_line(text, needle), (needle, text)
    # after close, log lines go straight to stdout again
    distributed.log("after the bar")
    assert screen.getvalue().endswith("\nafter the bar\n")
