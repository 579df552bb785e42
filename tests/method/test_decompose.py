"""Shared basis via the Gram matrix, against numpy SVD, and its sharded sum over experts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from bitsmoe_jax.method import decompose as bs

REPO = Path(__file__).resolve().parents[2]


def _experts(e: int, f: int, d: int, seed: int) -> np.ndarray:
    """Experts with a shared low-rank structure plus noise, so singular values are well spread."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((d, d)) * np.geomspace(1.0, 0.05, d)[None, :]
    w = rng.standard_normal((e, f, d)) @ shared.T + 0.02 * rng.standard_normal((e, f, d))
    return w.astype(np.float32)


def test_gram_matches_numpy_loops():
    w = _experts(5, 12, 10, 0)
    g = np.zeros((10, 10))
    for e in range(5):
        g += w[e].astype(np.float64).T @ w[e].astype(np.float64)
    np.testing.assert_allclose(np.asarray(bs.gram_rows(w)), g, rtol=1e-5, atol=1e-4)
    wd = np.ascontiguousarray(np.swapaxes(w, 1, 2))  # [E, D, F]
    gd = sum(wd[e].astype(np.float64) @ wd[e].astype(np.float64).T for e in range(5))
    np.testing.assert_allclose(np.asarray(bs.gram_cols(wd)), gd, rtol=1e-5, atol=1e-4)
    # bf16 inputs are accumulated in float32
    wb = w.astype(ml_dtypes.bfloat16)
    ref = sum(wb[e].astype(np.float64).T @ wb[e].astype(np.float64) for e in range(5))
    out = bs.gram_rows(wb)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-4)


def test_rows_basis_equals_svd_of_stacked_experts_and_reconstructs():
    e, f, d = 6, 20, 16
    w = _experts(e, f, d, 1)
    v, ev = bs.basis_from_gram(bs.gram_rows(w))
    v, ev = np.asarray(v), np.asarray(ev)
    assert v.shape == (d, d) and ev.shape == (d,)
    _, s, vt = np.linalg.svd(w.reshape(e * f, d).astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(ev, s**2, rtol=1e-4, atol=1e-5 * s[0] ** 2)
    # same subspaces, column by column, up to sign (singular values here are well separated)
    np.testing.assert_allclose(np.abs(np.sum(v * vt.T, axis=0)), 1.0, atol=1e-4)
    np.testing.assert_allclose(v.T @ v, np.eye(d), atol=1e-5)
    a = np.asarray(bs.expert_factors_rows(w, v))
    assert a.shape == (e, f, d)
    np.testing.assert_allclose(np.einsum("efr,dr->efd", a, v), w, atol=2e-5 * np.abs(w).max())
    for k in range(e):
        np.testing.assert_allclose(a[k], w[k].astype(np.float64) @ v, rtol=1e-5, atol=1e-5)


def test_cols_basis_equals_left_singular_vectors_and_reconstructs():
    e, d, f = 5, 12, 18
    w = np.ascontiguousarray(np.swapaxes(_experts(e, f, d, 2), 1, 2))  # [E, D, F]
    u, ev = bs.basis_from_gram(bs.gram_cols(w))
    u, ev = np.asarray(u), np.asarray(ev)
    stacked = np.concatenate(list(w), axis=1).astype(np.float64)  # [W_1 ... W_E], D x E*F
    uu, s, _ = np.linalg.svd(stacked, full_matrices=False)
    np.testing.assert_allclose(ev, s**2, rtol=1e-4, atol=1e-5 * s[0] ** 2)
    np.testing.assert_allclose(np.abs(np.sum(u * uu, axis=0)), 1.0, atol=1e-4)
    b = np.asarray(bs.expert_factors_cols(w, u))
    assert b.shape == (e, d, f)
    np.testing.assert_allclose(np.einsum("dr,erf->edf", u, b), w, atol=2e-5 * np.abs(w).max())


def test_truncated_rank_is_the_best_rank_r_approximation():
    e, f, d, r = 4, 30, 20, 7
    w = _experts(e, f, d, 3)
    v, ev = bs.basis_from_gram(bs.gram_rows(w), rank=r)
    v = np.asarray(v)
    assert v.shape == (d, r)
    a = np.asarray(bs.expert_factors_rows(w, v))
    resid = np.sum((np.einsum("efr,dr->efd", a, v).astype(np.float64) - w) ** 2)
    s = np.linalg.svd(w.reshape(e * f, d).astype(np.float64), compute_uv=False)
    assert resid == pytest.approx(np.sum(s[r:] ** 2), rel=1e-3)
    with pytest.raises(ValueError):
        bs.basis_from_gram(bs.gram_rows(w), rank=d + 1)


def test_sign_normalisation_is_deterministic():
    w = _experts(3, 10, 8, 4)
    g = np.asarray(bs.gram_rows(w))
    v1, _ = bs.basis_from_gram(g)
    v1 = np.asarray(v1)
    pivot = np.argmax(np.abs(v1), axis=0)
    assert np.all(v1[pivot, np.arange(8)] > 0)
    # an orthogonally equivalent input with flipped coordinates gives the same canonical signs
    flip = np.diag(np.where(np.arange(8) % 2 == 0, 1.0, -1.0))
    v2, _ = bs.basis_from_gram(flip @ g @ flip)
    v2 = np.asarray(v2)
    assert np.all(v2[np.argmax(np.abs(v2), axis=0), np.arange(8)] > 0)
    np.testing.assert_allclose(np.abs(v2), np.abs(flip @ v1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(bs.basis_from_gram(g)[0]), v1)


def test_quantize_basis():
    w = _experts(4, 16, 24, 5)
    v, _ = bs.basis_from_gram(bs.gram_rows(w))
    v = np.asarray(v)
    stored, deq = bs.quantize_basis(v, 8)
    codes, scales = np.asarray(stored.values), np.asarray(stored.scales)
    assert stored.bits == 8 and codes.dtype == np.int8 and scales.dtype == ml_dtypes.bfloat16
    assert codes.shape == (24, 24) and scales.shape == (24,)
    assert np.abs(codes.astype(int)).max() <= 127
    s32 = scales.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(deq), codes.astype(np.float32) * s32[:, None])
    # no clipping: every entry is within half a step of the original, row maxima included
    assert np.all(np.abs(np.asarray(deq) - v) <= 0.5 * s32[:, None] * (1 + 1e-6))
    assert np.all(s32 >= np.abs(v).max(1) / 127)
    stored16, deq16 = bs.quantize_basis(v, 16)
    assert stored16.scales is None and np.asarray(stored16.values).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(deq16), v.astype(ml_dtypes.bfloat16).astype(np.float32)
    )
    assert bs.basis_stored_bits(24, 24, 8) == codes.size * 8 + scales.size * 16
    assert bs.basis_stored_bits(2048, 2048, 16) == 2048 * 2048 * 16
    for bad in (3, 5, 7):
        with pytest.raises(ValueError, match="basis bits"):
            bs.quantize_basis(v, bad)


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("d", [24, 64])  # D not / a multiple of 32: padded / whole plane blocks
def test_low_bit_basis_codes_words_and_bits(bits, d):
    """4- and 6-bit bases: symmetric codes, row maxima never clipped, the stored bit-plane words
    decode (numpy, bit by bit) to exactly the codes, and the stored bits are the arrays' bytes."""
    rng = np.random.default_rng(bits + d)
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v = v[:, : d - 5].astype(np.float32)  # truncated rank: r differs from D
    stored, deq = bs.quantize_basis(v, bits)
    codes, s32 = np.asarray(stored.values).astype(int), np.asarray(stored.scales).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    assert stored.bits == bits and np.abs(codes).max() == qmax  # every row maximum at ±qmax
    assert np.all(np.abs(codes).max(axis=1) == qmax)
    np.testing.assert_array_equal(np.asarray(deq), codes.astype(np.float32) * s32[:, None])
    assert np.all(np.abs(np.asarray(deq) - v) <= 0.5 * s32[:, None] * (1 + 1e-6))
    arrays = bs.stored_basis_arrays(np.asarray(stored.values), np.asarray(stored.scales), bits)
    assert set(arrays) == {"planes", "scale"} and arrays["planes"].dtype == np.uint32
    words = arrays["planes"]  # [r, ceil(D/32)·b]: column c's D codes, 32 per block, plane-major
    nb = -(-d // 32)
    assert words.shape == (d - 5, nb * bits)
    decoded = np.zeros((d - 5, nb * 32), np.int64)
    for blk in range(nb):
        for p in range(bits):
            w = words[:, blk * bits + p].astype(np.int64)
            for i in range(32):
                decoded[:, blk * 32 + i] |= ((w >> i) & 1) << p
    decoded = decoded[:, :d] - 2 ** (bits - 1)  # offset binary, the factors' convention
    np.testing.assert_array_equal(decoded.T, codes)
    np.testing.assert_array_equal(np.asarray(bs.basis_codes(arrays)), codes)
    assert bs.basis_bits_of(arrays) == bits and bs.has_basis(arrays)
    stored_bits = sum(a.size * a.dtype.itemsize * 8 for a in arrays.values())
    assert bs.basis_stored_bits(d, d - 5, bits) == stored_bits
    assert stored_bits == nb * 32 * (d - 5) * bits + 16 * d


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from bitsmoe_jax.method import decompose as bs

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 24, 16)).astype(np.float32)       # [E, F, D]
    wd = rng.standard_normal((8, 16, 24)).astype(np.float32)      # [E, D, F]
    mesh = Mesh(np.array(jax.devices()), ("e",))
    shard = NamedSharding(mesh, P("e"))
    ws, wds = jax.device_put(w, shard), jax.device_put(wd, shard)
    out = {}
    for name, fn, full, sharded in (("rows", bs.gram_rows, w, ws), ("cols", bs.gram_cols, wd, wds)):
        ref = np.asarray(fn(full))
        got = fn(sharded)
        hlo = jax.jit(fn).lower(sharded).compile().as_text()
        out[name] = {
            "max_abs_diff": float(np.abs(np.asarray(got) - ref).max()),
            "scale": float(np.abs(ref).max()),
            "input_shards": len(sharded.addressable_shards),
            "all_reduce": "all-reduce" in hlo,
        }
    v, _ = bs.basis_from_gram(bs.gram_rows(ws))
    a = bs.expert_factors_rows(ws, v)
    a_ref = bs.expert_factors_rows(w, np.asarray(v))
    out["factors_max_abs_diff"] = float(np.abs(np.asarray(a) - np.asarray(a_ref)).max())
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_gram_sum_over_four_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    for name in ("rows", "cols"):
        r = out[name]
        assert r["input_shards"] == 4
        assert r["all_reduce"], f"{name}: no all-reduce in the compiled sharded program"
        assert r["max_abs_diff"] <= 1e-5 * r["scale"]
    assert out["factors_max_abs_diff"] < 1e-4
