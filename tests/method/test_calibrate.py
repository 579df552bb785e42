"""`collect_expert_stats` against a brute-force float64 loop over tokens and their routed experts.

The reference walks token by token and slot by slot, recomputes the expert's SwiGLU in float64,
takes silu' by a central finite difference (not the closed form the code uses), and accumulates

    S_gate[e][f, k] += w² (silu'(g_f) u_f)² z_g,k²      S_up[e][f, k] += w² silu(g_f)² z_u,k²
    c_down[e][f]    += w² (silu(g_f) u_f)²               mass[e]       += w²

Starved experts (fewer than `min_tokens` routed assignments) follow the documented fallback: every
token as if routed to the expert, with weight p_e / Σ_{j ∈ topk ∪ {e}} p_j, the sums then scaled so
the mass equals the routed mass (or 1e-6 × the mean routed mass of the experts that got tokens).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitsmoe_jax.method.calibrate import collect_expert_stats

E, D, F, N, K = 4, 16, 24, 50, 2
R_G, R_U = 16, 11  # a full-rank gate basis and a truncated up basis


def silu(v):
    return v / (1.0 + np.exp(-v))


def dsilu_fd(v, h=1e-5):
    return (silu(v + h) - silu(v - h)) / (2 * h)


def orthonormal(rng, d, r):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q[:, :r]


def softmax(a):
    a = a - a.max(axis=-1, keepdims=True)
    ex = np.exp(a)
    return ex / ex.sum(axis=-1, keepdims=True)


def topk_routing(logits, k):
    """Mixtral routing in numpy: softmax, top-k (largest first), renormalised."""
    probs = softmax(np.asarray(logits, np.float64))
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, idx, axis=1)
    return idx, w / w.sum(axis=1, keepdims=True), probs


def make_layer(seed=0, starve=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    gate = (rng.standard_normal((E, D, F)) * 0.4).astype(np.float32)
    up = (rng.standard_normal((E, D, F)) * 0.4).astype(np.float32)
    vg = orthonormal(rng, D, R_G).astype(np.float32)
    vu = orthonormal(rng, D, R_U).astype(np.float32)
    logits = rng.standard_normal((N, E)).astype(np.float32)
    if starve:
        logits[:, 3] -= 6.0  # expert 3: never in a top-2 (but a small, token-dependent probability)
        logits[:, 2] -= (
            2.0  # expert 2: in a few tokens' top-2, a sizeable probability for all of them
        )
    idx, w, probs = topk_routing(logits, K)
    return dict(x=x, gate=gate, up=up, vg=vg, vu=vu, logits=logits, idx=idx, w=w, probs=probs)


def brute_force(x, gate, up, vg, vu, assignments):
    """assignments: iterable of (token, expert, weight). float64 sums over them."""
    s_gate = np.zeros((E, F, vg.shape[1]))
    s_up = np.zeros((E, F, vu.shape[1]))
    c_down = np.zeros((E, F))
    mass = np.zeros(E)
    X = x.astype(np.float64)
    for t, e, wt in assignments:
        xt = X[t]
        g = xt @ gate[e].astype(np.float64)
        u = xt @ up[e].astype(np.float64)
        zg = vg.astype(np.float64).T @ xt
        zu = vu.astype(np.float64).T @ xt
        for f in range(F):
            a_g = wt**2 * (dsilu_fd(g[f]) * u[f]) ** 2
            a_u = wt**2 * silu(g[f]) ** 2
            for kk in range(zg.shape[0]):
                s_gate[e, f, kk] += a_g * zg[kk] ** 2
            for kk in range(zu.shape[0]):
                s_up[e, f, kk] += a_u * zu[kk] ** 2
            c_down[e, f] += wt**2 * (silu(g[f]) * u[f]) ** 2
        mass[e] += wt**2
    return s_gate, s_up, c_down, mass


def run(layer, min_tokens):
    return collect_expert_stats(
        jnp.asarray(layer["x"]),
        jnp.asarray(layer["logits"]),
        jnp.asarray(layer["idx"], jnp.int32),
        jnp.asarray(layer["w"], jnp.float32),
        jnp.asarray(layer["gate"]),
        jnp.asarray(layer["up"]),
        jnp.asarray(layer["vg"]),
        jnp.asarray(layer["vu"]),
        min_tokens=min_tokens,
    )


def close(actual, expected, rtol=2e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def routed_assignments(layer):
    return [
        (t, int(layer["idx"][t, j]), float(layer["w"][t, j])) for t in range(N) for j in range(K)
    ]


def test_routed_statistics_match_brute_force():
    layer = make_layer(seed=1, starve=False)
    stats = run(layer, min_tokens=0)
    ref = brute_force(
        layer["x"], layer["gate"], layer["up"], layer["vg"], layer["vu"], routed_assignments(layer)
    )
    assert stats.starved == []
    assert (
        stats.s_gate.shape == (E, F, R_G)
        and stats.s_up.shape == (E, F, R_U)
        and stats.c_down.shape == (E, F)
    )
    for got, want in zip((stats.s_gate, stats.s_up, stats.c_down, stats.mass), ref, strict=False):
        close(got, want)
    counts = np.bincount(layer["idx"].reshape(-1), minlength=E)
    np.testing.assert_array_equal(stats.tokens, counts)
    assert counts.sum() == N * K and (counts > 0).all()


def test_sums_are_over_tokens_not_means():
    """Duplicating every token doubles every statistic (routing frequency stays in the
    objective)."""
    layer = make_layer(seed=2, starve=False)
    doubled = dict(layer)
    for key in ("x", "logits", "idx", "w"):
        doubled[key] = np.concatenate([layer[key], layer[key]])
    a, b = run(layer, 0), run(doubled, 0)
    for name in ("s_gate", "s_up", "c_down", "mass"):
        close(getattr(b, name), 2 * getattr(a, name))


def test_starved_experts_use_the_documented_fallback():
    layer = make_layer(seed=3, starve=True)
    counts = np.bincount(layer["idx"].reshape(-1), minlength=E)
    assert counts[3] == 0 and 0 < counts[2] < 16 and counts[0] >= 16 and counts[1] >= 16
    stats = run(layer, min_tokens=16)
    assert sorted(stats.starved) == [2, 3]
    np.testing.assert_array_equal(stats.tokens, counts)
    for name in ("s_gate", "s_up", "c_down", "mass"):
        assert np.all(np.isfinite(getattr(stats, name))), name

    routed = brute_force(
        layer["x"], layer["gate"], layer["up"], layer["vg"], layer["vu"], routed_assignments(layer)
    )
    # experts 0 and 1 are not starved: their routed statistics are untouched
    for got, want in zip(
        (stats.s_gate, stats.s_up, stats.c_down, stats.mass), routed, strict=False
    ):
        close(got[:2], want[:2])

    probs = layer["probs"]
    routed_mass = routed[3]
    mean_routed = routed_mass[routed_mass > 0].mean()
    for e in (2, 3):
        # the weight each token would have had if e were among its experts
        w_as_if = []
        for t in range(N):
            members = set(int(j) for j in layer["idx"][t]) | {e}
            w_as_if.append(probs[t, e] / sum(probs[t, j] for j in members))
        fb = brute_force(
            layer["x"],
            layer["gate"],
            layer["up"],
            layer["vg"],
            layer["vu"],
            [(t, e, w_as_if[t]) for t in range(N)],
        )
        target = routed_mass[e] if routed_mass[e] > 0 else 1e-6 * mean_routed
        scale = target / fb[3][e]
        close(stats.mass[e], target)
        close(stats.s_gate[e], scale * fb[0][e])
        close(stats.s_up[e], scale * fb[1][e])
        close(stats.c_down[e], scale * fb[2][e])
        # the fallback gives every element some weight (no unit of a starved expert looks free)
        assert (
            (stats.c_down[e] > 0).all()
            and (stats.s_gate[e] > 0).all()
            and (stats.s_up[e] > 0).all()
        )

    # the tokens actually routed to expert 2 keep their true routing weight in the fallback, while
    # the others get a weight comparable to it (so how they are weighted against each other matters)
    routed_t = [t for t in range(N) if 2 in layer["idx"][t]]
    for t in routed_t:
        j = list(layer["idx"][t]).index(2)
        members = set(int(i) for i in layer["idx"][t])
        assert probs[t, 2] / sum(probs[t, i] for i in members) == pytest.approx(
            layer["w"][t, j], rel=1e-6
        )
    others = [
        probs[t, 2] / (probs[t, 2] + sum(probs[t, i] for i in layer["idx"][t]))
        for t in range(N)
        if t not in routed_t
    ]
    assert max(others) > 0.5 * min(layer["w"][layer["idx"] == 2])


def test_min_tokens_threshold_is_strict_lower_bound():
    """An expert with exactly min_tokens assignments is not starved; one fewer is."""
    layer = make_layer(seed=3, starve=True)
    n2 = int((layer["idx"] == 2).sum())
    assert 2 not in run(layer, min_tokens=n2).starved
    assert 2 in run(layer, min_tokens=n2 + 1).starved
