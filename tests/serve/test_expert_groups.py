"""A written layer's packed factors in groups of experts (format 2): what is read back is the
layer's `PackedMatrix` bit for bit, whichever shards of experts the groups were written from.

The reference is the layer packed whole by `pack_segments` (one matrix of every expert's units) —
not the group writer or reader. Shards are packed independently, by `pack_segments` on their own
experts' units, as the processes of a run pack them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.io.checkpoint import load_tree, save_tree
from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.packing import pack_segments
from bitsmoe_jax.serve import quantized_checkpoint as qc
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts
from bitsmoe_jax.serve.read_bytes import layer_read_bytes

E, D, F, GS = 5, 32, 40, 16
RANKS = {"gate": 6, "up": 3, "down": 5}
WIDTHS = (0, 1, 2, 3, 4, 8, 16)


def _layer():
    """(units, widths, weights) per projection and the stored bases of a random layer."""
    rng = np.random.default_rng(0)
    parts, bases = {}, {}
    for p in PROJECTIONS:
        r = RANKS[p]
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        stored, _ = basis_lib.quantize_basis(jnp.asarray(q[:, :r], jnp.float32), 8)
        bases[p] = basis_lib.stored_basis_arrays(
            np.asarray(stored.values), np.asarray(stored.scales), 8
        )
        units = rng.standard_normal((E, r, F)).astype(np.float32)
        widths = rng.choice(WIDTHS, size=(E, r))
        weights = rng.uniform(0.1, 3.0, size=(E, r, F)).astype(np.float32)
        parts[p] = (units, widths, weights)
    return parts, bases


def _packed(parts, lo, hi):
    return {
        p: pack_segments(
            u[lo:hi].reshape(-1, F), w[lo:hi].reshape(-1), GS, wt[lo:hi].reshape(-1, F)
        )
        for p, (u, w, wt) in parts.items()
    }


@pytest.fixture(scope="module")
def layer():
    parts, bases = _layer()
    whole = QuantizedExperts(E, bases, _packed(parts, 0, E))
    shards = [(lo, hi, _packed(parts, lo, hi)) for lo, hi in ((0, 2), (2, 5))]
    return whole, shards, bases


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def _assert_same_arrays(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


def _read_back(root, meta):
    item = load_tree(root / "params" / "layer_000")
    return qc.load_layer_experts(root, 0, item["experts_q"], meta)


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_groups_read_back_as_the_whole_layer(tmp_path, layer, size):
    whole, _, _ = layer
    meta = qc.save_layer(tmp_path, 0, {}, whole, {"gate": np.zeros((E, 6))}, group_size=size)
    assert meta["expert_group_size"] == size
    assert len(list(qc.groups_dir(tmp_path, 0).glob("group_*.bin"))) == -(-E // size)
    arrays = _read_back(tmp_path, meta)
    _assert_same_arrays(arrays, whole.to_tree()[0])
    back = QuantizedExperts.from_tree(arrays, meta)
    assert back.stored_bits() == whole.stored_bits()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_groups_written_from_shards_are_the_same_files(tmp_path, layer, size):
    """Process-like shards [0, 2) and [2, 5): a group of 4 takes rows from both."""
    whole, shards, bases = layer
    ref_meta = qc.save_layer(tmp_path / "whole", 0, {}, whole, None, group_size=size)
    pieces = [qc.ExpertShard(lo, hi - lo, packed) for lo, hi, packed in shards]
    head = qc.LayerHead.of_shards(
        bases,
        [
            (
                {p: np.asarray(pm.perm) for p, pm in packed.items()},
                QuantizedExperts(hi - lo, bases, packed).tree_meta(),
            )
            for lo, hi, packed in shards
        ],
    )
    ref = qc.LayerHead.of(whole)
    for p in PROJECTIONS:
        np.testing.assert_array_equal(head.perms[p], ref.perms[p])
        assert head.factors[p] == ref.factors[p]
    assert head.stored_bits() == whole.stored_bits()
    ours = layer_read_bytes(head.stored_arrays(), head.meta(size))
    theirs = layer_read_bytes(whole.stored_arrays(), whole.tree_meta())
    assert ours[0] == theirs[0]
    np.testing.assert_array_equal(ours[1], theirs[1])

    out = tmp_path / "sharded"
    meta = qc.save_layer_head(out, 0, {}, head, None, size)
    assert meta == ref_meta
    groups = qc.expert_groups(E, size)
    # each "process" writes the groups that start in its shard, from every shard the group needs
    for lo, hi, _ in shards:
        mine = [k for k, (g0, _) in enumerate(groups) if lo <= g0 < hi]
        qc.save_expert_groups(out, 0, E, size, pieces, mine)
    for k in range(len(groups)):  # the same files, byte for byte
        for suffix in ("bin", "json"):
            name = f"group_{k:03d}.{suffix}"
            assert (qc.groups_dir(out, 0) / name).read_bytes() == (
                qc.groups_dir(tmp_path / "whole", 0) / name
            ).read_bytes(), name
    _assert_same_arrays(_read_back(out, meta), whole.to_tree()[0])


def test_a_missing_or_wrong_group_is_named(tmp_path, layer):
    whole, _, _ = layer
    meta = qc.save_layer(tmp_path, 0, {}, whole, None, group_size=2)
    d = qc.groups_dir(tmp_path, 0)
    one = (d / "group_001.bin").read_bytes(), (d / "group_001.json").read_bytes()
    for suffix in ("bin", "json"):  # a group of 1 expert where 2 are expected
        (d / f"group_001.{suffix}").write_bytes((d / f"group_002.{suffix}").read_bytes())
    with pytest.raises(ValueError, match="group_001"):
        _read_back(tmp_path, meta)
    (d / "group_001.bin").unlink()
    with pytest.raises(FileNotFoundError, match="group_001"):
        _read_back(tmp_path, meta)
    (d / "group_001.bin").write_bytes(one[0])
    (d / "group_001.json").write_bytes(one[1])
    _assert_same_arrays(_read_back(tmp_path, meta), whole.to_tree()[0])


def test_format_1_layers_still_load(tmp_path, layer):
    """A layer item holding the whole `experts_q` (written before the groups) reads as it is."""
    whole, _, _ = layer
    arrays, meta = whole.to_tree()
    save_tree(tmp_path / "params" / "layer_000", {"dense": {}, "experts_q": arrays})
    _assert_same_arrays(_read_back(tmp_path, meta), arrays)


@pytest.mark.parametrize(
    ("experts", "starts", "size"),
    [
        (1, (), 1),
        (8, (), 1),
        (60, (), 4),  # padded to 64: 15 groups of 4
        (128, (), 8),
        (256, (), 16),
        (256, (0, 128), 16),  # 2 processes: the same groups as 1
        (256, tuple(range(0, 256, 8)), 8),  # 32 processes of 8 experts: a group each
        (384, (0, 192), 32),
    ],
)
def test_group_size(experts, starts, size):
    assert qc.expert_group_size(experts, starts) == size
    groups = qc.expert_groups(experts, size)
    assert len(groups) <= max(qc.MAX_EXPERT_GROUPS, len(starts))  # more processes: smaller
    assert groups[0][0] == 0 and groups[-1][1] == experts
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
