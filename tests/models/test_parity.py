"""Parity of the Flax MoE transformer with Hugging Face transformers (PyTorch, fp32, eager
attention).

For each family a tiny random-weight model with the family's real features switched on is built by
transformers, saved with `save_pretrained`, loaded with `load_model` and compared on 2 x 64 tokens:
full-sequence logits, jitted logits, KV-cache prefill + decode logits, and 16 greedy tokens against
`generate`. The references are transformers' own outputs, never our code.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import (
    FAMILIES,
    PARITY_TOL,
    flax_logits,
    hf_greedy,
    hf_logits,
    max_abs_diff,
    random_ids,
)

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bitsmoe_jax.inference import greedy_generate, jit_logits  # noqa: E402

PARITY_FAMILIES = list(FAMILIES)
# Compiling the decode path costs a few seconds per model: generation and the KV cache are checked
# on one model per family plus the sliding-window Mixtral (the routing variants only change the MoE
# block, which the full-sequence logits already cover).
GEN_FAMILIES = ["mixtral", "mixtral_sw", "qwen2_moe", "qwen3_moe"]
JIT_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
SEQ = 64
PROMPT = 24
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=PARITY_FAMILIES)
def case(request, tiny_family, flax_from_hf):
    family = request.param
    hf_dir, hf = tiny_family(family)
    model, config = flax_from_hf(hf_dir)
    ids = random_ids(2, SEQ, seed=1)
    return dict(
        family=family,
        hf_dir=hf_dir,
        hf=hf,
        model=model,
        config=config,
        ids=ids,
        ref=hf_logits(hf, ids),
    )


def test_config_matches_hf_architecture(case):
    """Which layers are MoE, biases, q/k norm, head_dim and window agree with the instantiated HF
    model."""
    hf, cfg, family = case["hf"], case["config"], case["family"]
    hf_moe = tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts"))
    assert cfg.moe_layers == hf_moe, f"{family}: MoE layers {cfg.moe_layers} != HF {hf_moe}"
    assert 0 < len(hf_moe), family
    if family.startswith("qwen"):
        assert len(hf_moe) < cfg.num_hidden_layers, (
            f"{family}: the test model should have a dense layer"
        )
    attn = hf.model.layers[0].self_attn
    assert cfg.attention_bias == (attn.q_proj.bias is not None)
    ours = case["model"].layers[0].self_attn
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        has_bias = getattr(attn, proj).bias is not None
        assert (getattr(ours, proj).bias is not None) == has_bias, (
            f"{family}: {proj} bias presence differs from HF"
        )
    assert cfg.qk_norm == hasattr(attn, "q_norm")
    assert cfg.head_dim == attn.head_dim
    assert cfg.sliding_window == (
        hf.config.sliding_window or None
    )  # qwen2_moe says 0 when disabled
    if family.startswith("qwen2"):
        assert (
            cfg.shared_expert_intermediate_size
            == hf.model.layers[hf_moe[0]].mlp.shared_expert.up_proj.out_features
        )


def test_reference_routing_is_nontrivial(case):
    """The random weights route unevenly and use every expert, so a routing bug changes the
    logits."""
    hf, k = case["hf"], case["config"].num_experts_per_tok
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(case["ids"]), output_router_logits=True)
    for r in out.router_logits:
        p = r.float().softmax(-1)
        used = set(p.topk(k, dim=-1).indices.flatten().tolist())
        assert len(used) == p.shape[-1], f"only experts {sorted(used)} used"
        assert p.max(-1).values.mean() > 1.5 / p.shape[-1], "routing is nearly uniform"


def test_logits_match_hf(case):
    ours = flax_logits(case["model"], case["ids"])
    assert ours.shape == case["ref"].shape
    d = max_abs_diff(ours, case["ref"])
    print(f"\n{case['family']}: max |logit diff| vs HF = {d:.3e}")
    assert d <= PARITY_TOL, f"{case['family']}: max |logit diff| vs HF = {d:.3e} > {PARITY_TOL}"
    # The logits are not degenerate (a vacuous comparison would pass trivially).
    assert case["ref"].std() > 0.3


@pytest.mark.parametrize("case", JIT_FAMILIES, indirect=True)
def test_jit_logits_equal_eager(case):
    eager = flax_logits(case["model"], case["ids"])
    jitted = np.asarray(jit_logits(case["model"])(case["ids"]))
    d = max_abs_diff(eager, jitted)
    assert d <= 1e-5, f"{case['family']}: jit vs eager max diff {d:.3e}"
    d_hf = max_abs_diff(jitted, case["ref"])
    assert d_hf <= PARITY_TOL, f"{case['family']}: jitted max |logit diff| vs HF = {d_hf:.3e}"


@pytest.mark.parametrize("case", GEN_FAMILIES, indirect=True)
def test_kv_cache_prefill_and_decode_match_hf(case):
    """Prefill 24 tokens into a 40-slot cache, then feed 15 tokens one at a time: every step's
    logits
    equal HF's full-sequence logits at that position.

    Uses the same jitted step as `greedy_generate` (so both tests share one compilation per model).
    """
    from bitsmoe_jax.inference import _cached_step

    model, ids, ref = case["model"], case["ids"], case["ref"]
    graphdef, state = nnx.split(model)
    cache = model.init_cache(
        ids.shape[0], PROMPT + NEW_TOKENS
    )  # the last slot stays empty: must be masked
    last, cache = _cached_step(graphdef, state, jnp.asarray(ids[:, :PROMPT], jnp.int32), cache)
    steps = [np.asarray(last)]
    for t in range(PROMPT, PROMPT + NEW_TOKENS - 1):
        last, cache = _cached_step(
            graphdef, state, jnp.asarray(ids[:, t : t + 1], jnp.int32), cache
        )
        steps.append(np.asarray(last))
    assert int(cache["length"]) == PROMPT + NEW_TOKENS - 1
    cached = np.stack(steps, axis=1)  # logits at positions PROMPT-1 .. PROMPT+NEW_TOKENS-2
    d = max_abs_diff(cached, ref[:, PROMPT - 1 : PROMPT + NEW_TOKENS - 1])
    assert d <= PARITY_TOL, (
        f"{case['family']}: cached decode logits vs HF full-sequence logits max diff {d:.3e}"
    )


@pytest.mark.parametrize("case", GEN_FAMILIES, indirect=True)
def test_greedy_generate_matches_hf(case):
    prompt = case["ids"][:, :PROMPT]
    expected = hf_greedy(case["hf"], prompt, NEW_TOKENS)
    got = np.asarray(greedy_generate(case["model"], prompt, NEW_TOKENS))
    assert got.shape == (2, NEW_TOKENS)
    assert (got == expected).all(), (
        f"{case['family']}: greedy tokens differ\nours {got}\nHF   {expected}"
    )
    # The continuation is not a constant token (which would make the comparison weak).
    assert len(np.unique(expected)) > 2


def test_sliding_window_reference_is_honoured(tiny_family):
    """HF eager attention does apply Mixtral's window=16 (same weights with and without a
    window)."""
    _, full = tiny_family("mixtral")
    _, windowed = tiny_family("mixtral_sw")
    ids = random_ids(2, SEQ, seed=1)
    a, b = hf_logits(full, ids), hf_logits(windowed, ids)
    w = windowed.config.sliding_window
    assert w == 16 and windowed.config._attn_implementation == "eager"
    assert max_abs_diff(a[:, :w], b[:, :w]) <= 1e-6, (
        "same weights: identical logits inside the window"
    )
    assert max_abs_diff(a[:, w + 1 :], b[:, w + 1 :]) > 1e-2, (
        "the window must change logits beyond it"
    )
