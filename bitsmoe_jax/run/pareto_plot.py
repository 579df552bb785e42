"""`pareto.png`: KL divergence to the unquantized model against effective bits per weight.

One series per method (BitsMoE and each baseline in `compare`; the budgets of one multi-budget
`quantize` run), the KL on a log axis because the budgets span decades of it. The figure is drawn
with matplotlib's Agg canvas directly (no pyplot, no display, no global state), so it works in a
headless job and in a thread, and the same numbers always give the same bytes.

The points are also written into the PNG itself (a `tEXt` chunk, key `bitsmoe:series`, JSON), so
the file says exactly what it shows. Drawing conventions a reader can rely on: each point is a
marker filled with its series' palette colour exactly; the lines joining them and the legend's
handles are drawn translucent (so no other pixel has that exact colour).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PALETTE = (  # distinct in colour and lightness (colour-blind friendly "tab10" order)
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
SERIES_KEY = "bitsmoe:series"

Series = Mapping[str, list[tuple[float, float]]]


def series_from_rows(
    rows: Iterable[Mapping[str, Any]], x: str = "effective_bpw_experts", y: str = "kl_divergence"
) -> dict[str, list[tuple[float, float]]]:
    """{method: [(bpw, KL), ...] sorted by bpw} from report or compare rows; rows without a
    finite positive KL (no evaluation, or a lossless setting) have no place on a log axis."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        bx, ky = r.get(x), r.get(y)
        if bx is None or ky is None or not (math.isfinite(ky) and ky > 0):
            continue
        out.setdefault(str(r.get("method", "bitsmoe")), []).append((float(bx), float(ky)))
    return {m: sorted(p) for m, p in out.items()}


def write_pareto_png(path: str | Path, series: Series, title: str) -> Path | None:
    """Draw `series` to `path` (written to a temporary file, then renamed); None (nothing written)
    when no series has a point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    series = {m: list(p) for m, p in series.items() if p}
    if not series:
        return None
    fig = Figure(figsize=(7.0, 4.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    colors = {}
    for k, (method, points) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        colors[method] = color
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=color, alpha=0.45, linewidth=1.5, zorder=2)
        ax.plot(
            xs,
            ys,
            linestyle="none",
            marker="o",
            markersize=7,
            markerfacecolor=color,
            markeredgecolor=color,
            zorder=3,
        )
        handles.append(
            Line2D([], [], color=color, alpha=0.8, marker="o", markersize=6, label=method)
        )
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per expert weight (everything stored counted)")
    ax.set_ylabel("KL(unquantized ‖ quantized), nats/token")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    meta = {m: {"color": colors[m], "points": p} for m, p in series.items()}
    fig.savefig(
        tmp,
        format="png",
        metadata={"Title": title, "Software": None, SERIES_KEY: json.dumps(meta)},
    )
    os.replace(tmp, out)
    return out
