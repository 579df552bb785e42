"""GPTQ baseline: beats RTN on correlated inputs, stays on the RTN grid, matches a float64 textbook
loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from bitsmoe_jax.baselines.gptq import expert_hessians, gptq_quantize_experts, gptq_quantize_matrix
from bitsmoe_jax.baselines.rtn import rtn_quantize
from bitsmoe_jax.models.moe import combine, grouped_swiglu, make_routing_plan

K, N = 64, 16


def _correlated_tokens(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Gaussian tokens with a strongly non-diagonal covariance and uneven feature scales."""
    a = rng.normal(size=(k, k)) / np.sqrt(k)
    mix = np.eye(k) + 1.5 * a
    z = rng.normal(size=(n, k)) * np.exp(rng.normal(0, 0.5, size=k))
    return (z @ mix).astype(np.float32)


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = _correlated_tokens(rng, 512, K)
    w = rng.normal(size=(K, N)).astype(np.float32)
    return x, w, (x.astype(np.float64).T @ x).astype(np.float32)


def _bf16(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _textbook_grid(grp, bits, zero_point):
    """(scale, zero) of one group's rows [g, N] (float64 loop reference of both grids)."""
    if not zero_point:
        return _bf16(np.abs(grp).max(0) / (2 ** (bits - 1) - 1)), np.zeros(grp.shape[1])
    lo, hi = np.minimum(grp.min(0), 0.0), np.maximum(grp.max(0), 0.0)
    scale = _bf16((hi - lo) / (2**bits - 1))
    zero = np.array(
        [
            np.clip(np.rint(-low / s), 0, 2**bits - 1) if s > 0 else 0.0
            for low, s in zip(lo, scale, strict=False)
        ]
    )
    return scale, zero


def _textbook_gptq(w, h, bits, group_size, damp=0.01, act_order=False, zero_point=False):
    """Plain float64 GPTQ, one row (PyTorch column) at a time, no blocking."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    k = w.shape[0]
    for i in range(k):
        if h[i, i] == 0:
            h[i, i] = 1.0
            w[i] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[perm], h[np.ix_(perm, perm)]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    q = np.zeros_like(w)
    scale = zero = None
    for i in range(k):
        if i % group_size == 0:
            scale, zero = _textbook_grid(w[i : i + group_size], bits, zero_point)
        safe = np.where(scale > 0, scale, 1.0)
        if zero_point:
            q[i] = (np.clip(np.rint(w[i] / safe) + zero, 0, 2**bits - 1) - zero) * scale
        else:
            q[i] = np.clip(np.rint(w[i] / safe), qmin, qmax) * scale
        err = (w[i] - q[i]) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    out = np.empty_like(q)
    out[perm] = q
    return out


def _out_err(x, w, wq) -> float:
    d = x.astype(np.float64) @ (np.asarray(w, np.float64) - np.asarray(wq, np.float64))
    return float((d**2).sum())


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, K])
def test_gptq_beats_rtn_on_layer_output(problem, group_size, act_order, zero_point):
    x, w, h = problem
    for bits in (2, 3, 4):
        wq = np.asarray(
            gptq_quantize_matrix(w, h, bits, group_size, act_order=act_order, zero_point=zero_point)
        )
        e_gptq = _out_err(x, w, wq)
        e_rtn = _out_err(x, w, rtn_quantize(w, bits, group_size, axis=0, zero_point=zero_point))
        assert e_gptq < 0.8 * e_rtn, (bits, group_size, act_order, e_gptq, e_rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 16), (4, K), (3, K)])
def test_gptq_values_on_grid(problem, bits, group_size, act_order):
    _, w, h = problem
    wq = np.asarray(gptq_quantize_matrix(w, h, bits, group_size, act_order=act_order), np.float64)
    # Groups are runs of consecutive rows in the (possibly act-order permuted) quantization order.
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(K)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for g0 in range(0, K, group_size):
        block = wq[order[g0 : g0 + group_size]]  # [gs, N]
        for n in range(N):
            col = block[:, n]
            amax = np.abs(col).max()
            if amax == 0:
                continue
            # The scale is a bf16 number s with every value an integer multiple of s in [qmin,
            # qmax]. The largest |value| is |c|·s for some integer 1 ≤ |c| ≤ 2^(b-1): try each.
            ok = False
            for c in range(1, qmax + 2):
                s = amax / c
                if _bf16(s) != s:
                    continue
                codes = col / s
                if (
                    np.allclose(codes, np.rint(codes), atol=1e-6)
                    and codes.min() >= qmin - 1e-6
                    and codes.max() <= qmax + 1e-6
                ):
                    ok = True
                    break
            assert ok, (g0, n, col)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, K), (4, 16)])
def test_identity_hessian_equals_rtn(problem, bits, group_size, act_order, zero_point):
    _, w, _ = problem
    wq = np.asarray(
        gptq_quantize_matrix(
            w,
            np.eye(K, dtype=np.float32),
            bits,
            group_size,
            act_order=act_order,
            zero_point=zero_point,
        )
    )
    np.testing.assert_array_equal(
        wq, rtn_quantize(w, bits, group_size, axis=0, zero_point=zero_point)
    )


@pytest.mark.parametrize(
    "bits,group_size,act_order,block",
    [(3, 16, False, 16), (4, 16, True, 48), (2, K, True, 12), (3, K, False, 16)],
)
def test_blocked_equals_unblocked(problem, bits, group_size, act_order, block):
    """block 48: groups of 16 inside blocks, last block shorter; block 12 with g=64: the block is
    shrunk to 8 and groups span several blocks; 16 with g=64: groups span four blocks."""
    x, w, h = problem
    full = np.asarray(
        gptq_quantize_matrix(w, h, bits, group_size, act_order=act_order, block_size=128)
    )
    blk = np.asarray(
        gptq_quantize_matrix(w, h, bits, group_size, act_order=act_order, block_size=block)
    )
    # Same arithmetic in another order: equal to float tolerance. A value sitting on a rounding
    # boundary (a code or a bf16 scale tie) may flip by one grid step; allow that only for a tiny
    # fraction of entries, and require the same layer-output error.
    close = np.isclose(blk, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert close.mean() >= 0.99, close.mean()
    assert abs(_out_err(x, w, blk) - _out_err(x, w, full)) <= 1e-3 * _out_err(x, w, full)


@pytest.mark.parametrize(
    "bits,group_size,act_order,block,zero_point",
    [
        (3, 16, False, 128, False),
        (2, 16, True, 128, False),
        (2, K, True, 12, False),
        (4, 16, True, 48, False),
        (2, 16, False, 128, True),
        (3, K, True, 12, True),
        (2, 16, True, 48, True),
    ],
)
def test_matches_float64_textbook(problem, bits, group_size, act_order, block, zero_point):
    _, w, h = problem
    h = h.copy()
    h[5, :] = h[:, 5] = 0.0  # one dead input
    got = np.asarray(
        gptq_quantize_matrix(
            w, h, bits, group_size, act_order=act_order, block_size=block, zero_point=zero_point
        ),
        np.float64,
    )
    ref = _textbook_gptq(w, h, bits, group_size, act_order=act_order, zero_point=zero_point)
    assert np.all(got[5] == 0)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel


def _silu(v):
    return v / (1.0 + np.exp(-v))


def test_expert_hessians_against_token_loop():
    rng = np.random.default_rng(1)
    n, d, f, e = 64, 8, 12, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    gate = rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d)
    up = rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d)
    idx = np.stack([rng.choice(3, size=2, replace=False) for _ in range(n)]).astype(
        np.int32
    )  # expert 3 unused
    idx[:5, 1] = 3  # expert 3 gets 5 tokens: starved with min_tokens=16
    wts = rng.uniform(0.1, 1.0, size=idx.shape).astype(np.float32)
    h_in, h_down, tokens, starved = expert_hessians(x, idx, wts, gate, up, e, min_tokens=16)
    assert starved == [3]
    ref_in = np.zeros((e, d, d))
    ref_down = np.zeros((e, f, f))
    count = np.zeros(e, int)
    for t in range(n):
        for j in range(idx.shape[1]):
            ex = idx[t, j]
            xt = x[t].astype(np.float64)
            ht = _silu(xt @ gate[ex]) * (xt @ up[ex])
            ref_in[ex] += np.outer(xt, xt)
            ref_down[ex] += np.outer(ht, ht)
            count[ex] += 1
    np.testing.assert_array_equal(tokens, count)
    for ex in range(3):
        np.testing.assert_allclose(h_in[ex], ref_in[ex], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(h_down[ex], ref_down[ex], rtol=1e-4, atol=1e-3)
    # Starved expert: the all-token Hessians (h from expert 3's own weights on every token).
    x64 = x.astype(np.float64)
    h3 = _silu(x64 @ gate[3]) * (x64 @ up[3])
    np.testing.assert_allclose(h_in[3], x64.T @ x64, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(h_down[3], h3.T @ h3, rtol=1e-4, atol=1e-3)


def _moe_out(x, idx, wts, gate, up, down) -> np.ndarray:
    plan = make_routing_plan(jnp.asarray(idx), jnp.asarray(wts), gate.shape[0])
    xs = jnp.asarray(x)[plan.token]
    y = grouped_swiglu(xs, plan.group_sizes, jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down))
    return np.asarray(combine(plan, y, x.shape[0]), np.float64)


def test_gptq_experts_beats_rtn_on_moe_output():
    rng = np.random.default_rng(2)
    e, d, f, n = 4, 32, 48, 256
    x = _correlated_tokens(rng, n, d)
    gate = (rng.normal(size=(e, d, f)) / np.sqrt(d)).astype(np.float32)
    up = (rng.normal(size=(e, d, f)) / np.sqrt(d)).astype(np.float32)
    down = (rng.normal(size=(e, f, d)) / np.sqrt(f)).astype(np.float32)
    router = rng.normal(size=(d, e)).astype(np.float32)
    w_all, idx = jax.lax.top_k(jax.nn.softmax(jnp.asarray(x @ router), axis=-1), 2)
    wts = np.asarray(w_all / w_all.sum(-1, keepdims=True))
    idx = np.asarray(idx, np.int32)
    y = _moe_out(x, idx, wts, gate, up, down)
    for bits, gs in ((3, 16),):
        out = gptq_quantize_experts(gate, up, down, x, idx, wts, bits, group_size=gs)
        assert (
            out["gate"].shape == gate.shape
            and out["up"].shape == up.shape
            and out["down"].shape == down.shape
        )
        assert all(np.all(np.isfinite(np.asarray(out[k]))) for k in ("gate", "up", "down"))
        assert out["starved"] == [] and out["bpw"] == bits + 16 / gs
        assert int(np.sum(out["tokens"])) == 2 * n
        y_g = _moe_out(x, idx, wts, out["gate"], out["up"], out["down"])
        rtn = [rtn_quantize(m, bits, gs, axis=1) for m in (gate, up, down)]
        y_r = _moe_out(x, idx, wts, *rtn)
        err_g, err_r = float(((y - y_g) ** 2).sum()), float(((y - y_r) ** 2).sum())
        print(
            f"MoE output error bits={bits} g={gs}: GPTQ {err_g:.4g}  RTN {err_r:.4g}  ratio "
            f"{err_g / err_r:.3f}"
        )
        assert err_g < err_r, (bits, gs, err_g, err_r)
