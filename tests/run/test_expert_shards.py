"""An expert-parallel layer in the work directory: each process stages the packed shard of its
consecutive experts, process 0's commit moves this run's shards into the layer, and reading the
layer joins them into the block one process packing every expert would have written."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.run import workdir as wd
from bitsmoe_jax.serve.synthetic_experts import quantized_from_dense

E, D, F = 6, 16, 32
SPLIT = 4  # process 0: experts 0-3, process 1: experts 4-5


def _block(lo: int, hi: int):
    """Experts [lo, hi) of one random layer: the bases are the seed's first draws, the same for
    every range, and each unit is packed on its own, so a range is exactly its experts' part."""
    rng = np.random.default_rng(0)
    w = np.random.default_rng(1)
    gate, up = w.normal(size=(2, E, D, F)).astype(np.float32)
    down = w.normal(size=(E, F, D)).astype(np.float32)
    bits = {p: w.choice([0, 2, 3, 16], size=(E, D)) for p in PROJECTIONS}
    qe = quantized_from_dense(
        gate[lo:hi], up[lo:hi], down[lo:hi], {p: b[lo:hi] for p, b in bits.items()}, rng, 16
    )
    return qe, bits


def _as_process(monkeypatch, k: int, count: int = 2) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: k)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_shards_committed_and_joined_equal_the_whole_layer(tmp_path, monkeypatch):
    work = wd.WorkDir(tmp_path / "w")
    work.root.mkdir()
    whole, bits = _block(0, E)
    # a leftover of an attempt with 4 processes: not one of this run's, never read
    _as_process(monkeypatch, 3, 4)
    work.stage_shard(0, _block(0, 1)[0], 0)
    for k, (lo, hi) in ((1, (SPLIT, E)), (0, (0, SPLIT))):  # staged in any order
        _as_process(monkeypatch, k)
        work.stage_shard(0, _block(lo, hi)[0], lo)
    work.commit_layer(0, {}, np.zeros((1, D), np.float32), {}, (None, bits, [], {}))
    assert sorted(p.name for p in (work.root / "layer_000").glob("shard_*.json")) == [
        "shard_0000.json",
        "shard_0001.json",
    ]
    got, got_bits, _, _ = work.load_packed(0)
    (ref, ref_meta), (arr, meta) = whole.to_tree(), got.to_tree()
    assert meta == ref_meta
    flat_ref, flat_got = jax.tree.leaves_with_path(ref), jax.tree.leaves_with_path(arr)
    assert [k for k, _ in flat_ref] == [k for k, _ in flat_got]
    for (_, a), (_, b) in zip(flat_ref, flat_got, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    for p in PROJECTIONS:
        np.testing.assert_array_equal(got_bits[p], bits[p])


def test_a_missing_shard_is_an_error_not_a_smaller_layer(tmp_path, monkeypatch):
    work = wd.WorkDir(tmp_path / "w")
    work.root.mkdir()
    _, bits = _block(0, E)
    _as_process(monkeypatch, 1)  # process 1's shard only: experts 0-3 missing
    work.stage_shard(0, _block(SPLIT, E)[0], SPLIT)
    work.commit_layer(0, {}, np.zeros((1, D), np.float32), {}, (None, bits, [], {}))
    with pytest.raises(ValueError, match="do not join"):
        work.load_packed(0)
    _as_process(monkeypatch, 0)  # the first experts only: the last two missing
    work.stage_shard(1, _block(0, SPLIT)[0], 0)
    work.commit_layer(1, {}, np.zeros((1, D), np.float32), {}, (None, bits, [], {}))
    with pytest.raises(ValueError, match="hold 4 experts, the layer has 6"):
        work.load_packed(1)
