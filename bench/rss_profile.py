"""Where a quantization run's peak memory is: RSS sampled over time against the stage that ran.

    python bench/rss_profile.py --config configs/tiny.py [--config.field=value ...]
        [--interval-ms 20] [--timeline]

Runs `python -m bitsmoe_jax.quantize` with the given arguments in this process, samples VmRSS
every `--interval-ms` from a thread, and records when each stage function of the streamed layer
pipeline starts and ends (bases, statistics chunks, problem, allocation, packing, the forward of
the next layer's calibration input). Prints the peak, the innermost stages running at the peak, and
per stage the largest RSS seen while it ran; `--timeline` also prints every stage boundary with
the RSS at that moment, the largest sampled since the previous boundary, and the kernel's VmHWM
(marked where it rose by more than 8 MiB since the previous boundary: the stage that set the
true peak, which sampling can miss). The peak RSS of the whole process (VmHWM) is what
`bench/memory.py` reports; this script says which stage sets it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# (module, function) pairs timed as stages
STAGES = (
    ("bitsmoe_jax.method.streamed", "streamed_bases"),
    ("bitsmoe_jax.method.streamed", "_chunk_stats"),
    ("bitsmoe_jax.method.streamed", "round_and_pack"),
    ("bitsmoe_jax.method.streamed", "_sorted_rows"),
    ("bitsmoe_jax.method.streamed", "_combined_rows"),
    ("bitsmoe_jax.method.streamed", "detect_super_experts"),
    ("bitsmoe_jax.run.driver", "build_problem"),
    ("bitsmoe_jax.run.budgets", "allocate_layers"),
    ("bitsmoe_jax.method.streamed", "fit_factors"),
    ("bitsmoe_jax.method.streamed", "sampled_loss"),
    ("bitsmoe_jax.method.sharded", "round_gather"),
    ("bitsmoe_jax.method.layer_problem", "_dropped_units"),
    ("bitsmoe_jax.method.layer_problem", "solve_units"),
    ("bitsmoe_jax.run.driver", "pack_layer"),
    ("bitsmoe_jax.run.driver", "attention_part"),
    ("bitsmoe_jax.run.driver", "calibration_tokens"),
    ("bitsmoe_jax.run.driver", "write_outputs"),
    ("bitsmoe_jax.serve.quantized_experts", "round_and_pack"),
)


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Recorder:
    """RSS samples and stage boundaries, on one clock."""

    def __init__(self, interval_s: float):
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []
        self.events: list[tuple[float, str, str]] = []  # (time, "start" | "end", stage)
        self.hwm: list[int] = []  # VmHWM at each event: the true peak so far (no sampling gaps)
        self.interval_s = interval_s
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _sample(self) -> None:
        while self.running:
            self.samples.append((self.now(), rss_bytes()))
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self.running = False
        self.thread.join()
        self.samples.append((self.now(), rss_bytes()))

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.events.append((self.now(), "start", name))
            self.hwm.append(rss_bytes("VmHWM"))
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((self.now(), "end", name))
                self.hwm.append(rss_bytes("VmHWM"))

        return wrapper

    def active_at(self, t: float) -> list[str]:
        stack: list[str] = []
        for when, kind, name in self.events:
            if when > t:
                break
            if kind == "start":
                stack.append(name)
            elif name in stack:
                stack.reverse()
                stack.remove(name)
                stack.reverse()
        return stack

    def stage_peaks(self) -> dict[str, int]:
        """Per stage, the largest RSS sampled while some call of it ran."""
        out: dict[str, int] = {}
        open_at: dict[str, list[float]] = {}
        spans: list[tuple[str, float, float]] = []
        for when, kind, name in self.events:
            if kind == "start":
                open_at.setdefault(name, []).append(when)
            elif open_at.get(name):
                spans.append((name, open_at[name].pop(), when))
        for name, a, b in spans:
            inside = [r for t, r in self.samples if a <= t <= b]
            if inside:
                out[name] = max(out.get(name, 0), max(inside))
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--timeline", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args()
    if args.help:
        print(__doc__)
        return 0
    import importlib

    rec = Recorder(args.interval_ms / 1000)
    for module, name in STAGES:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            setattr(mod, name, rec.timed(name, getattr(mod, name)))
    from bitsmoe_jax import quantize

    rc = quantize.main(rest)
    rec.stop()
    gib = 1 << 30
    t_peak, peak = max(rec.samples, key=lambda s: s[1])
    print(f"\npeak RSS {peak / gib:.2f} GiB at {t_peak:.1f} s, in: {rec.active_at(t_peak) or '-'}")
    print("| stage | largest RSS while it ran |")
    print("|---|---|")
    for name, r in sorted(rec.stage_peaks().items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {r / gib:.2f} GiB |")
    if args.timeline:
        print("     time  at event  max since the previous event  VmHWM (* where it rose)")
        last, last_hwm = 0.0, 0
        for (when, kind, name), hwm in zip(rec.events, rec.hwm, strict=True):
            r = min(rec.samples, key=lambda s: abs(s[0] - when))[1]
            between = max((m for t, m in rec.samples if last <= t <= when), default=r)
            rose = "*" if hwm > last_hwm + (8 << 20) else " "
            print(
                f"{when:9.1f} s {r / gib:6.2f} GiB {between / gib:6.2f} GiB "
                f"{hwm / gib:6.3f} GiB{rose} {kind:5s} {name}"
            )
            last, last_hwm = when, max(last_hwm, hwm)
    return rc


if __name__ == "__main__":
    sys.exit(main())
