"""The quantized expert block against dense references built from its dequantized weights.

* `dense_weights()` against an independent reconstruction: the dequantized basis times each unit
  fake-quantized on its own by `quantizers.quantize_dequantize` (no packing, no permutation);
* the block's forward against `models.moe.Experts` holding those dense weights, and against a
  float64 numpy loop over tokens and routed experts — bit mixes 0/1/2/3/4/8/16, experts with no
  tokens, whole experts and whole projections at 0 bits, 4-, 6-, 8- and 16-bit bases, truncated
  rank;
* `MoEBlock` with the experts swapped vs with dense dequantized experts;
* `to_tree`/`from_tree` through `checkpoint.save_tree`/`load_tree`: bit-identical, zero-size arrays
  included;
* `stored_bits` against a hand count;
* a whole model with quantized experts under `jax.jit` (`inference.jit_logits`).
"""

from __future__ import annotations

import functools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitsmoe_jax.inference import jit_logits
from bitsmoe_jax.io.checkpoint import load_tree, save_tree
from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method import quantizers
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.packing import pack_segments, permutation_bits
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.moe import Experts, MoEBlock, make_routing_plan
from bitsmoe_jax.models.transformer import build_model
from bitsmoe_jax.serve.quantized_experts import QuantizedExperts

E, D, F, G = (
    5,
    32,
    40,
    16,
)  # F is not a multiple of 32 (padded words) nor of G (a ragged last group)
ALL_BITS = (0, 1, 2, 3, 4, 8, 16)


def orthonormal(rng, d, r):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:, :r]


@functools.cache
def build_case(case):
    return build(**CASES[case])


def build(seed, ranks=None, basis_bits=None, bits=None, e=E, d=D, f=F, g=G):
    """A QuantizedExperts plus the independent float64 reconstruction of its dense weights."""
    rng = np.random.default_rng(seed)
    ranks = ranks or {"gate": d, "up": d - 7, "down": d}
    basis_bits = basis_bits or {"gate": 8, "up": 16, "down": 8}
    bases, packed, ref, unit_bits = {}, {}, {}, {}
    for p in PROJECTIONS:
        r = ranks[p]
        stored, deq = basis_lib.quantize_basis(
            jnp.asarray(orthonormal(rng, d, r), jnp.float32), basis_bits[p]
        )
        bases[p] = basis_lib.stored_basis_arrays(
            np.asarray(stored.values),
            None if stored.scales is None else np.asarray(stored.scales),
            basis_bits[p],
        )
        units = (rng.standard_normal((e, r, f)) * rng.uniform(0.2, 2.0, size=(e, r, 1))).astype(
            np.float32
        )
        weights = rng.uniform(0.1, 3.0, size=(e, r, f)).astype(np.float32)
        # a random arrangement of a fixed multiset of widths (every width present; fewer jit shapes)
        b = (
            rng.permutation(np.resize(ALL_BITS, e * r)).reshape(e, r)
            if bits is None
            else bits(p, e, r)
        )
        unit_bits[p] = np.asarray(np.broadcast_to(b, (e, r)))
        packed[p] = pack_segments(
            units.reshape(-1, f), unit_bits[p].reshape(-1), g, weights.reshape(-1, f)
        )
        # independent reconstruction: units fake-quantized at their width (no packing, no
        # permutation)
        a = np.zeros((e, r, f))
        for bw in np.unique(unit_bits[p]):
            sel = unit_bits[p] == bw
            a[sel] = np.asarray(
                quantizers.quantize_dequantize(units[sel], int(bw), g, weights[sel])
            )
        v = np.asarray(deq, np.float64)
        ref[p] = np.einsum("dr,erf->edf", v, a) if p != "down" else np.einsum("erf,dr->efd", a, v)
    return QuantizedExperts(e, bases, packed), ref, unit_bits, bases


def dense_experts(w, e=E, d=D, f=F):
    ex = Experts(e, d, f, rngs=nnx.Rngs(0))
    ex.gate[...] = jnp.asarray(w["gate"], jnp.float32)
    ex.up[...] = jnp.asarray(w["up"], jnp.float32)
    ex.down[...] = jnp.asarray(w["down"], jnp.float32)
    return ex


def numpy_moe(x, idx, wts, w):
    y = np.zeros((x.shape[0], w["down"].shape[-1]))
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g, u = x[t] @ w["gate"][e], x[t] @ w["up"][e]
            y[t] += wts[t, j] * ((g / (1 + np.exp(-g))) * u) @ w["down"][e]
    return y


def routing(seed, n=37, k=2, used=(0, 2, 3)):
    """Random top-k assignments that only use `used` experts (the others get no tokens)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(used, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32)
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x, idx, w


def assert_close(a, b, rtol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


CASES = {
    "mix0": dict(seed=0),
    "mix1": dict(seed=1, basis_bits={"gate": 16, "up": 8, "down": 16}),
    # bases at 4 and 6 bits: codes in bit-plane words, unpacked where the forward reads them
    "lowbasis": dict(seed=2, basis_bits={"gate": 4, "up": 6, "down": 4}),
    # expert 1 entirely dropped, down entirely at 0 bits, up all at 16 bits
    "zeros": dict(
        seed=3,
        bits=lambda p, e, r: {
            "gate": np.where(np.arange(e)[:, None] == 1, 0, np.resize([1, 3, 8, 0], r)),
            "up": np.full((e, r), 16),
            "down": np.zeros((e, r), int),
        }[p],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_dense_experts_from_dequantized_weights(case):
    qe, ref, unit_bits, _ = build_case(case)
    if case.startswith("mix"):
        present = set(np.concatenate([b.ravel() for b in unit_bits.values()]).tolist())
        assert present == set(ALL_BITS), present
    dense = {p: np.asarray(v) for p, v in qe.dense_weights().items()}
    for p in PROJECTIONS:
        assert_close(dense[p], ref[p])
    if case == "zeros":
        assert np.all(dense["down"] == 0) and np.all(dense["gate"][1] == 0)

    x, idx, w = routing(seed=10)
    plan = make_routing_plan(jnp.asarray(idx), jnp.asarray(w), E)
    sizes = np.asarray(plan.group_sizes)
    assert sizes[1] == 0 and sizes[4] == 0 and sizes.sum() == idx.size
    y_q = np.asarray(qe(jnp.asarray(x), plan))
    y_dense = np.asarray(dense_experts(dense)(jnp.asarray(x), plan))
    y_np = numpy_moe(x.astype(np.float64), idx, w.astype(np.float64), ref)
    assert y_q.shape == (x.shape[0], D) and y_q.dtype == np.float32
    assert_close(y_q, y_dense, rtol=1e-5)
    assert_close(y_q, y_np, rtol=1e-5)
    if case != "zeros":
        assert np.abs(y_np).max() > 0.1


def test_moe_block_with_swapped_experts_matches_dense_dequantized():
    cfg = ModelConfig(
        model_type="mixtral",
        vocab_size=64,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=D // 2,
        intermediate_size=F,
        moe_intermediate_size=F,
        num_experts=E,
        num_experts_per_tok=2,
    )
    qe, _, _, _ = build_case("mix1")
    block_q = MoEBlock(cfg, rngs=nnx.Rngs(7))
    block_d = MoEBlock(cfg, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(
        np.asarray(block_q.router.kernel[...]), np.asarray(block_d.router.kernel[...])
    )
    original = np.asarray(block_q(jnp.ones((1, 1, D))))
    block_q.experts = qe
    block_d.experts = dense_experts(qe.dense_weights())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 11, D)), jnp.float32)
    y_q, y_d = np.asarray(block_q(x)), np.asarray(block_d(x))
    assert y_q.shape == (3, 11, D)
    assert_close(y_q, y_d, rtol=1e-5)
    assert not np.allclose(
        np.asarray(block_q(jnp.ones((1, 1, D)))), original
    )  # the swap took effect


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def test_tree_round_trip_through_checkpoint_is_bit_identical(tmp_path):
    qe, _, _, _ = build_case("zeros")
    qe_mix, _, _, _ = build_case("mix1")
    qe_low, _, _, _ = build_case("lowbasis")
    for name, q in (("zeros", qe), ("mix", qe_mix), ("low", qe_low)):
        arrays, meta = q.to_tree()
        save_tree(tmp_path / name, arrays)
        loaded = load_tree(tmp_path / name)
        meta2 = json.loads(json.dumps(meta))
        q2 = QuantizedExperts.from_tree(loaded, meta2)
        a, b = _flat(arrays), _flat(q2.to_tree()[0])
        assert a.keys() == b.keys()
        if name != "low":  # 0-bit segments / 16-bit scales: zero-size arrays
            assert any(v.size == 0 for v in a.values())
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].tobytes() == b[k].tobytes(), k
        assert q2.to_tree()[1] == meta
        x, idx, w = routing(seed=11)
        plan = make_routing_plan(jnp.asarray(idx), jnp.asarray(w), E)
        np.testing.assert_array_equal(
            np.asarray(q(jnp.asarray(x), plan)), np.asarray(q2(jnp.asarray(x), plan))
        )
        assert q2.stored_bits() == q.stored_bits()


@pytest.mark.parametrize("case", ["mix0", "mix1", "lowbasis", "zeros"])
def test_stored_bits_hand_count(case):
    spec = CASES[case]
    qe, _, unit_bits, bases = build_case(case)
    ranks = {"gate": D, "up": D - 7, "down": D}
    basis_bits = spec.get("basis_bits") or {"gate": 8, "up": 16, "down": 8}
    hand = 0
    for p in PROJECTIONS:
        r = ranks[p]
        bb = basis_bits[p]
        if bb == 16:  # bf16 values
            hand += D * r * 16
        elif bb == 8:  # int8 codes + bf16 row scales
            hand += D * r * 8 + D * 16
        else:  # bit-plane words, each column packed over D in 32-value blocks + bf16 row scales
            hand += -(-D // 32) * 32 * r * bb + D * 16
        hand += sum(quantizers.stored_bits(F, int(b), G) for b in unit_bits[p].ravel())
        hand += permutation_bits(E * r)
    assert qe.stored_bits() == hand
    # the same count from the stored arrays themselves (word/element sizes, permutation at ceil(log2
    # K))
    arrays, _ = qe.to_tree()
    from_arrays = 0
    for p in PROJECTIONS:
        b = arrays["basis"][p]
        assert (
            set(b)
            == {4: {"planes", "scale"}, 6: {"planes", "scale"}, 8: {"q", "scale"}, 16: {"q"}}[
                basis_bits[p]
            ]
        )
        from_arrays += sum(a.size * a.dtype.itemsize * 8 for a in b.values())
        f = arrays["factors"][p]
        from_arrays += sum(a.size * a.dtype.itemsize * 8 for a in f["payload"].values())
        from_arrays += sum(a.size * 16 for a in f["scales"].values())
        from_arrays += f["perm"].size * math.ceil(math.log2(f["perm"].size))
    assert from_arrays == hand


def test_whole_quantized_model_under_jit():
    """A model whose MoE layers hold QuantizedExperts runs under jax.jit and equals the dense model
    holding the dequantized weights (`dense_weights`) in every MoE layer."""
    from bitsmoe_jax.method.coefficients import layer_units

    cfg = ModelConfig(
        model_type="mixtral",
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=40,
        moe_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
    )
    model_q = build_model(cfg, seed=3)
    model_d = build_model(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 13))
    fp = np.asarray(jit_logits(model_d)(ids))
    rng = np.random.default_rng(1)
    k = cfg.num_experts * cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        ex = model_q.layers[i].mlp.experts
        gate, up, down = (np.asarray(getattr(ex, n)[...]) for n in ("gate", "up", "down"))
        stored, deq = {}, {}
        for p in PROJECTIONS:
            st, dq = basis_lib.quantize_basis(
                jnp.asarray(orthonormal(rng, cfg.hidden_size, cfg.hidden_size), jnp.float32), 8
            )
            stored[p], deq[p] = (
                {"q": np.asarray(st.values), "scale": np.asarray(st.scales)},
                np.asarray(dq),
            )
        units = layer_units(gate, up, down, deq)
        packed = {
            p: pack_segments(
                units[p].reshape(k, -1), rng.permutation(np.resize((0, 2, 3, 4, 8, 16), k)), 16
            )
            for p in PROJECTIONS
        }
        qe = QuantizedExperts(cfg.num_experts, stored, packed)
        model_q.layers[i].mlp.experts = qe
        dw = qe.dense_weights()
        for n in ("gate", "up", "down"):
            getattr(model_d.layers[i].mlp.experts, n)[...] = dw[n]
    lq = np.asarray(jit_logits(model_q)(ids))
    ld = np.asarray(jit_logits(model_d)(ids))
    assert lq.shape == (2, 13, cfg.vocab_size)
    assert_close(lq, ld, rtol=1e-4)
    assert np.abs(lq - fp).max() > 1e-4  # quantization changed the logits: the swap is real


def test_no_basis_experts_survive_the_work_dir_format(tmp_path):
    """A model without shared bases (basis="none") stores empty basis dicts; the work dir's array
    format keeps only arrays, so the round trip must not need the empty entries."""
    from bitsmoe_jax.io import arrayfile

    qe, _, _, _ = build_case("mix0")
    arrays, meta = qe.to_tree()
    arrays["basis"] = {p: {} for p in PROJECTIONS}
    no_basis = QuantizedExperts.from_tree(arrays, meta)
    arrayfile.save(tmp_path, "packed", {"experts_q": arrays}, meta)
    tree, meta2 = arrayfile.load(tmp_path, "packed")
    back = QuantizedExperts.from_tree(tree["experts_q"], meta2)
    assert all(back.basis_matrix(p) is None for p in PROJECTIONS)
    for p in PROJECTIONS:
        np.testing.assert_array_equal(
            np.asarray(back.factor_matrix(p)), np.asarray(no_basis.factor_matrix(p))
        )
