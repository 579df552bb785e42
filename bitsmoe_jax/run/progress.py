"""Per-layer progress of a quantization run: time per layer, its stages, and an ETA; process 0 only.

On a terminal it is a tqdm bar (stage timings in the postfix); otherwise (batch jobs, log files) one
plain line per layer, e.g.

    layer 3/32 done in 41.2 s (forward 2.0 s, basis 3.1 s, calibration 9.8 s, ...) — ETA 21 min

The ETA is the mean time of the layers finished *in this process* times the layers left, so a
resumed run does not count the layers it skipped as instantaneous.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from bitsmoe_jax.parallel import distributed


def format_duration(seconds: float) -> str:
    """'42 s', '21 min', '3 h 05 min' — precise enough for an ETA."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min"


def layer_line(
    index: int, total: int, seconds: float, stages: dict[str, float], eta_s: float | None
) -> str:
    """The plain-text progress line of one finished layer (index 0-based, shown 1-based)."""
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items() if v > 0)
    line = f"layer {index + 1}/{total} done in {seconds:.1f} s" + (f" ({parts})" if parts else "")
    return line + (f" — ETA {format_duration(eta_s)}" if eta_s is not None else "")


class LayerProgress:
    """Reports each finished layer; tqdm on a TTY, log lines otherwise, nothing off process 0."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        enabled: bool = True,
        tty: bool | None = None,
        emit: Callable[[str], None] = distributed.log,
        label: str = "",
    ):
        self.label = label  # which pass of the layers this is, when a run makes several
        self.total = total
        self.start = start
        self.enabled = enabled and distributed.is_writer()
        self.emit = emit
        self.durations: list[float] = []
        self.bar = None
        self._restore: Callable[[], None] | None = None
        if self.enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label or "quantize", unit="layer")
            self._route_lines_around(tqdm.write)
        if self.enabled and start:
            self.emit(f"resuming at layer {start + 1}/{total} ({start} layers already committed)")

    def eta(self, index: int) -> float | None:
        if not self.durations or index + 1 >= self.total:
            return None
        return sum(self.durations) / len(self.durations) * (self.total - index - 1)

    def layer_done(self, index: int, seconds: float, stages: dict[str, float]) -> str:
        """Record layer `index` (took `seconds`, split into `stages`); return its progress line."""
        self.durations.append(seconds)
        line = layer_line(index, self.total, seconds, stages, self.eta(index))
        if self.label:
            line = f"{self.label}: {line}"
        if not self.enabled:
            return line
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.1f}s" for k, v in stages.items() if v > 0})
            self.bar.update(1)
        else:
            self.emit(line)
        return line

    def _route_lines_around(self, write: Callable[..., None]) -> None:
        """While the bar is drawn, log lines and warnings are written through `write` (tqdm's: it
        clears the bar, prints the line, redraws the bar), so no line is glued to the bar."""
        previous_log = distributed.set_log_writer(lambda msg: write(msg, file=sys.stdout))
        previous_warn = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            text = warnings.formatwarning(message, category, filename, lineno, line)
            write(text.rstrip("\n"), file=file or sys.stderr)

        warnings.showwarning = show

        def restore() -> None:
            distributed.set_log_writer(previous_log)
            warnings.showwarning = previous_warn

        self._restore = restore

    def close(self) -> None:
        """End the display (idempotent; also on an error, so the error starts on its own line)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._restore is not None:
            self._restore()
            self._restore = None
