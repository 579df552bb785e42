"""llama.cpp K-quant baseline: the formats' sizes, stored fields that reproduce the values, fits
against a brute-force optimum, the imatrix against a token loop, and clear errors.

References independent of the code: llama.cpp's block sizes (bytes per 256 weights of its
`block_q2_K` … `block_q6_K` structs), a plain loop that dequantizes the stored fields, an exhaustive
grid search over (scale, offset), and per-expert mean squares computed token by token.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmoe_jax.baselines import kquants as kq
from bitsmoe_jax.baselines.rtn import rtn_bpw, rtn_quantize

# bytes per super-block of 256 weights in llama.cpp (ggml-common.h)
LLAMA_CPP_BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def test_block_sizes_are_llama_cpp_s():
    assert [t.name for t in kq.K_TYPES] == list(LLAMA_CPP_BLOCK_BYTES)
    for t in kq.K_TYPES:
        assert t.bytes_per_super_block == LLAMA_CPP_BLOCK_BYTES[t.name], t.name
        assert t.bpw == 8 * LLAMA_CPP_BLOCK_BYTES[t.name] / 256
    # never fewer bits than the target it is compared at
    picks = {x: kq.type_for_target(x).name for x in (1.0, 2.0, 2.5, 2.625, 3.0, 4.0, 5.0, 6.0, 8.0)}
    assert picks == {
        1.0: "Q2_K",
        2.0: "Q2_K",
        2.5: "Q2_K",
        2.625: "Q2_K",
        3.0: "Q3_K",
        4.0: "Q4_K",
        5.0: "Q5_K",
        6.0: "Q6_K",
        8.0: "Q6_K",
    }


def _rows(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((6, 512)).astype(np.float32) * np.exp(rng.normal(0, 1, (6, 1))).astype(
        np.float32
    )
    x[0, :256] = 0.0  # an all-zero super-block
    x[1, 16:48] = np.abs(x[1, 16:48]) + 0.5  # all-positive sub-blocks
    x[2, 100] = 40.0  # an outlier
    x[3, 300:316] = -np.abs(x[3, 300:316])  # an all-negative sub-block
    return x


def _dequantize_loop(f: dict, t: kq.KQuantType, shape: tuple[int, int]) -> np.ndarray:
    """The format's decoding, one weight at a time, from the stored integers and fp16 factors."""
    out = np.zeros(shape, np.float64)
    subs = 256 // t.sub_block
    per_row = shape[1] // 256
    for r in range(shape[0]):
        for b in range(per_row):
            sb = r * per_row + b
            for j in range(subs):
                for i in range(t.sub_block):
                    c = b * 256 + j * t.sub_block + i
                    out[r, c] = (
                        f["d"][sb] * f["sc"][sb, j] * f["q"][r, c] - f["dmin"][sb] * f["m"][sb, j]
                    )
    return out


@pytest.mark.parametrize("t", kq.K_TYPES, ids=lambda t: t.name)
def test_stored_fields_reproduce_the_values(t):
    rng = np.random.default_rng(0)
    x = _rows(rng)
    imp = np.exp(rng.normal(0, 1, 512)).astype(np.float32)
    f = kq.quantize_rows(x, imp[None, :], t)
    for k in ("d", "dmin"):
        assert np.array_equal(f[k], f[k].astype(np.float16).astype(np.float32)), (
            f"{k} is not an fp16 value"
        )
    qlo, qhi = t.code_range
    slo, shi = t.scale_range
    assert np.array_equal(f["q"], np.round(f["q"])) and f["q"].min() >= qlo and f["q"].max() <= qhi
    assert (
        np.array_equal(f["sc"], np.round(f["sc"])) and f["sc"].min() >= slo and f["sc"].max() <= shi
    )
    if t.with_min:
        assert f["d"].min() >= 0 and f["dmin"].min() >= 0
        assert (
            np.array_equal(f["m"], np.round(f["m"])) and f["m"].min() >= 0 and f["m"].max() <= shi
        )
    else:
        assert not f["dmin"].any() and not f["m"].any()
    np.testing.assert_allclose(f["values"], _dequantize_loop(f, t, x.shape), rtol=1e-6, atol=1e-6)
    assert not f["values"][0, :256].any()  # zeros stay zeros
    # the fit is tight: relative weighted error well below the grid's own resolution
    err = np.sum(imp * (x - f["values"]) ** 2) / np.sum(imp * x**2)
    assert err < {2: 0.12, 3: 0.04, 4: 0.01, 5: 0.003, 6: 0.001}[t.bits], err


def _brute_affine(x: np.ndarray, w: np.ndarray, hi: int) -> float:
    lo = min(float(x.min()), 0.0)
    s = np.linspace(1e-3, (x.max() - lo) / hi * 1.3, 300)[:, None, None]
    o = np.linspace(lo - 0.5, 0.0, 160)[None, :, None]
    q = np.clip(np.round((x - o) / s), 0, hi)
    return float(np.min(np.sum(w * (x - (s * q + o)) ** 2, -1)))


def _brute_symmetric(x: np.ndarray, w: np.ndarray, lo: int, hi: int) -> float:
    a = np.abs(x).max() / -lo * 1.5
    s = np.concatenate([np.linspace(-a, -1e-6, 8000), np.linspace(1e-6, a, 8000)])[:, None]
    q = np.clip(np.round(x / s), lo, hi)
    return float(np.min(np.sum(w * (x - s * q) ** 2, -1)))


def test_sub_block_fits_reach_the_brute_force_optimum():
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x[::4] = np.abs(x[::4])
    w = np.exp(rng.normal(0, 1, (40, 16))).astype(np.float32)
    s, o = (np.asarray(a, np.float64) for a in kq._fit_affine(jnp.asarray(x), jnp.asarray(w), 3))
    assert (s >= 0).all() and (o <= 0).all()
    q = np.clip(np.round((x - o[:, None]) / np.where(s > 0, s, 1)[:, None]), 0, 3)
    ours = np.sum(w * (x - (s[:, None] * q + o[:, None])) ** 2)
    brute = sum(_brute_affine(x[i], w[i], 3) for i in range(len(x)))
    assert ours <= 1.01 * brute, ours / brute
    s2, _ = kq._fit_scale(jnp.asarray(x), jnp.asarray(w), -4, 3)
    s2 = np.asarray(s2, np.float64)[:, None]
    ours2 = np.sum(w * (x - s2 * np.clip(np.round(x / s2), -4, 3)) ** 2)
    brute2 = sum(_brute_symmetric(x[i], w[i], -4, 3) for i in range(len(x)))
    assert ours2 <= 1.002 * brute2, ours2 / brute2


def test_importance_moves_the_error_to_unimportant_inputs():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    imp = np.where(np.arange(256) % 8 == 0, 100.0, 1.0).astype(np.float32)  # a few hot inputs
    t = kq.k_type("Q2_K")
    weighted = kq.kquantize(x, imp, t, axis=1, magnitude=False)
    plain = kq.kquantize(x, np.ones(256), t, axis=1, magnitude=False)

    def e(v):
        return float(np.sum(imp * (x - v) ** 2))

    assert e(weighted) < 0.8 * e(plain)
    # and along axis 0: the same rows transposed
    np.testing.assert_array_equal(kq.kquantize(x.T, imp, t, axis=0, magnitude=False), weighted.T)


def test_magnitude_weighting_is_llama_cpp_s():
    """importance × sqrt(σ² + w²), σ² the mean square of the weight's own super-block of 256."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((8, 512)) * np.where(np.arange(512) < 256, 1.0, 3.0)).astype(
        np.float32
    )
    imp = np.exp(rng.normal(0, 1, 512)).astype(np.float32)
    expected = np.empty_like(x)
    for r in range(8):
        for b in (0, 256):
            blk = x[r, b : b + 256].astype(np.float64)
            expected[r, b : b + 256] = imp[b : b + 256] * np.sqrt(np.mean(blk**2) + blk**2)
    t = kq.k_type("Q3_K")
    np.testing.assert_array_equal(
        kq.kquantize(x, imp, t, axis=1), kq.quantize_rows(x, expected, t)["values"]
    )


@pytest.mark.parametrize("name,bits,group", [("Q3_K", 3, 32), ("Q4_K", 4, 32)])
def test_fewer_bits_than_zero_point_rtn_and_lower_error(name, bits, group):
    """K-quants replaced llama.cpp's Q*_1 types: lower error at fewer stored bits."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((128, 512)) * np.exp(rng.normal(0, 0.5, (1, 512)))).astype(np.float32)
    t = kq.k_type(name)
    assert t.bpw < rtn_bpw(bits, group, zero_point=True)
    ours = np.sum((kq.kquantize(x, np.ones(512), t, axis=1, magnitude=False) - x) ** 2)
    rtn = np.sum((rtn_quantize(x, bits, group, axis=1, zero_point=True) - x) ** 2)
    assert ours < rtn


def test_expert_importance_against_token_loop():
    from bitsmoe_jax.baselines.gptq import expert_inputs

    rng = np.random.default_rng(5)
    e_count, d, f, n = 4, 256, 256, 48
    x = rng.standard_normal((n, d)).astype(np.float32)
    gate = (rng.standard_normal((e_count, d, f)) * 0.05).astype(np.float32)
    up = (rng.standard_normal((e_count, d, f)) * 0.05).astype(np.float32)
    idx = np.stack([rng.integers(0, 3, n), np.full(n, 3)], 1).astype(np.int32)
    idx[:, 1] = np.where(np.arange(n) < 5, 3, (idx[:, 0] + 1) % 3)  # expert 3 starved: 5 tokens
    w = np.full(idx.shape, 0.5, np.float32)
    got = {
        e: (np.mean(np.asarray(xe) ** 2, 0), np.mean(np.asarray(he) ** 2, 0), routed)
        for e, xe, he, routed in expert_inputs(x, idx, w, gate, up, e_count, min_tokens=8)
    }
    for e in range(e_count):
        toks = [t for t in range(n) if e in idx[t]]
        use = toks if len(toks) >= 8 else list(range(n))
        xs = x[use].astype(np.float64)
        g, u = xs @ gate[e], xs @ up[e]
        h = g / (1 + np.exp(-g)) * u
        assert got[e][2] == len(toks)
        np.testing.assert_allclose(got[e][0], np.mean(xs**2, 0), rtol=1e-5)
        np.testing.assert_allclose(got[e][1], np.mean(h**2, 0), rtol=1e-4, atol=1e-9)
    out = kq.kquant_experts(
        gate, up, np.swapaxes(gate, 1, 2), x, idx, w, kq.k_type("Q4_K"), min_tokens=8
    )
    assert out["starved"] == [3] and out["bpw"] == 4.5
    assert out["gate"].shape == gate.shape and out["down"].shape == (e_count, f, d)


def test_clear_errors():
    t = kq.k_type("Q2_K")
    with pytest.raises(ValueError, match=r"multiple of 256.*\(4, 300\)"):
        kq.quantize_rows(np.zeros((4, 300), np.float32), 1.0, t)
    bad = np.zeros((2, 256), np.float32)
    bad[1, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kq.quantize_rows(bad, 1.0, t)
    with pytest.raises(
        ValueError, match=r"Q2_K: weights up to \|3e\+06\| overflow the format's fp16"
    ):
        kq.quantize_rows(np.full((1, 256), 3e6, np.float32), 1.0, t)
    with pytest.raises(ValueError, match="importance has 3 entries"):
        kq.kquantize(np.zeros((256, 4), np.float32), np.ones(3), t, axis=0)
    with pytest.raises(ValueError, match="hidden_size=128, moe_intermediate_size=512"):
        kq.check_contractions(128, 512)
    with pytest.raises(ValueError, match="unknown K-quant type 'Q1_K'"):
        kq.k_type("Q1_K")
