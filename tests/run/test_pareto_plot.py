"""pareto.png, read back with an independent PNG decoder (`png_reader`, from the specification):
every point is drawn where its numbers say, on a log KL axis, and the file records those numbers."""

from __future__ import annotations

import json

import numpy as np

from bitsmoe_jax.run.pareto_plot import SERIES_KEY, series_from_rows, write_pareto_png
from tests.run.png_reader import read_png


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def _marker_centres(pixels: np.ndarray, color: str) -> list[tuple[float, float]]:
    """Centres (x, y in pixels) of the blobs of exactly `color`, split where columns are empty."""
    mask = (pixels[..., :3] == _hex_rgb(color)).all(-1)
    cols = np.flatnonzero(mask.any(0))
    blobs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    centres = []
    for b in blobs:
        ys, xs = np.nonzero(mask[:, b[0] : b[-1] + 1])
        centres.append((float(xs.mean() + b[0]), float(ys.mean())))
    return centres


def test_points_sit_on_a_log_axis_in_their_colours(tmp_path):
    # A decade per step for "a", flat for "b" above every point of "a": log spacing is even.
    rows = [
        {"method": "a", "effective_bpw_experts": 2.0, "kl_divergence": 1e-1},
        {"method": "a", "effective_bpw_experts": 3.0, "kl_divergence": 1e-2},
        {"method": "a", "effective_bpw_experts": 4.0, "kl_divergence": 1e-3},
        {"method": "b", "effective_bpw_experts": 2.5, "kl_divergence": 0.5},
        {"method": "b", "effective_bpw_experts": 3.5, "kl_divergence": 0.5},
        {"method": "c", "effective_bpw_experts": 3.0, "kl_divergence": float("nan")},  # no KL
        {"method": "d", "effective_bpw_experts": 3.0},  # no evaluation
    ]
    path = write_pareto_png(tmp_path / "pareto.png", series_from_rows(rows), "test")
    pixels, text = read_png(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    meta = json.loads(text[SERIES_KEY])
    assert text["Title"] == "test"
    assert sorted(meta) == ["a", "b"]  # no log-axis place for a NaN or a missing KL
    assert meta["a"]["points"] == [[2.0, 0.1], [3.0, 0.01], [4.0, 0.001]]
    a = _marker_centres(pixels, meta["a"]["color"])
    b = _marker_centres(pixels, meta["b"]["color"])
    assert len(a) == 3 and len(b) == 2
    (x0, y0), (x1, y1), (x2, y2) = a
    assert x0 < x1 < x2 and y0 < y1 < y2  # more bits: right; less KL: lower (y grows down)
    assert abs((x1 - x0) - (x2 - x1)) < 1.5  # linear bpw axis
    assert abs((y1 - y0) - (y2 - y1)) < 1.5  # log KL axis: one decade, the same height
    assert abs(b[0][1] - b[1][1]) < 1.0 and b[0][1] < y0  # flat, and above "a"'s highest KL
    # bpw 2.5 sits halfway between bpw 2 and 3
    assert abs(b[0][0] - (x0 + x1) / 2) < 1.5


def test_nothing_is_written_without_a_point(tmp_path):
    rows = [{"method": "a", "effective_bpw_experts": 2.0}]
    assert write_pareto_png(tmp_path / "p.png", series_from_rows(rows), "t") is None
    assert list(tmp_path.iterdir()) == []


def test_same_numbers_same_bytes(tmp_path):
    s = {"bitsmoe": [(2.0, 0.0035), (3.0, 0.0007)], "gptq": [(2.1, 0.04), (3.0, 0.03)]}
    one = write_pareto_png(tmp_path / "1.png", s, "t").read_bytes()
    assert one == write_pareto_png(tmp_path / "2.png", s, "t").read_bytes()
