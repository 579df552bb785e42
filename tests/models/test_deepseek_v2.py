"""DeepSeek-V2 / V2-Lite parity with Hugging Face transformers (PyTorch).

Tiny random-weight `DeepseekV2ForCausalLM` models with the real features switched on (MLA with and
without a low-rank query, YaRN with mscale / mscale_all_dim, dense first layer, two fused shared
experts, greedy and group-limited-greedy routing, routed_scaling_factor != 1) are saved with
`save_pretrained`, loaded with `bitsmoe_jax.load_model`, and compared on full-sequence logits and on
greedy decoding through the KV cache. The published DeepSeek-V2-Lite config is checked for an exact
parameter count against transformers on the meta device.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import bitsmoe_jax  # noqa: E402
from bitsmoe_jax.inference import _cached_step, greedy_generate, jit_logits  # noqa: E402
from bitsmoe_jax.models import ModelConfig, build_model  # noqa: E402
from bitsmoe_jax.models.config import ConfigError  # noqa: E402
from bitsmoe_jax.models.transformer import count_params as param_count  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# deepseek-ai/DeepSeek-V2-Lite config.json (the hub file, transformers-4 spelling).
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

V2_LITE_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

TINY = dict(
    vocab_size=192,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=163840,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,  # so min_new_tokens masks nothing in HF generate
    pad_token_id=0,
)

CASES = {
    # DeepSeek-V2: low-rank query, group-limited routing, attention biases, a YaRN attention factor
    # != 1 (mscale != mscale_all_dim), and rms_norm_eps far from the MLA norms' fixed 1e-6.
    "v2": dict(
        q_lora_rank=48,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        attention_bias=True,
        rms_norm_eps=1e-3,
        rope_parameters={**V2_LITE_YARN, "mscale": 1.0},
    ),
    # DeepSeek-V2-Lite: full-rank query, greedy routing, the published YaRN parameters.
    "v2_lite": dict(
        q_lora_rank=None,
        topk_method="greedy",
        routed_scaling_factor=1.5,
        rms_norm_eps=1e-6,
        rope_parameters=dict(V2_LITE_YARN),
    ),
}

SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 72, 2, 24, 16


def _hf_model(case: str):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV2Config(**TINY, **copy.deepcopy(CASES[case]))
    config._attn_implementation = "eager"  # float32 softmax, the reference our attention follows
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm: around 1, not around 0
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    case = request.param
    hf = _hf_model(case)
    path = tmp_path_factory.mktemp(f"deepseek_{case}")
    hf.save_pretrained(path)
    ours, config = bitsmoe_jax.load_model(path)
    return case, hf, ours, config


def test_config_parsed(pair):
    case, hf, _, config = pair
    assert config.is_mla
    assert config.q_lora_rank == hf.config.q_lora_rank
    assert config.topk_method == hf.config.topk_method
    assert config.routed_scaling_factor == hf.config.routed_scaling_factor
    assert config.moe_layers == (1, 2)
    assert dict(config.rope_scaling)["rope_type"] == "yarn"


def test_mla_structure_and_scale(pair):
    _, hf, ours, _ = pair
    for i, layer in enumerate(ours.layers):
        attn, ref = layer.self_attn, hf.model.layers[i].self_attn
        assert attn.scale == pytest.approx(ref.scaling, rel=1e-12)
        assert (attn.q_proj is None) == (ref.q_proj is None)
    # attention scale really includes mscale(40, 0.707)^2 on top of qk_head_dim^-0.5
    assert ours.layers[0].self_attn.scale == pytest.approx(
        24**-0.5 * (0.1 * 0.707 * np.log(40) + 1) ** 2
    )


def test_logits_match_hf(pair):
    case, hf, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    with torch.no_grad():
        ref = hf(ids).logits.float().numpy()
    got = np.asarray(jit_logits(ours)(ids.numpy()))
    assert got.shape == ref.shape
    assert np.abs(ref).max() > 1.0, "degenerate test model: logits too small to mean anything"
    diff = float(np.abs(got - ref).max())
    assert diff <= 1e-4, f"{case}: max |logits diff| {diff:.3g}"


def test_routing_is_nontrivial(pair):
    """The routers of the tiny models spread tokens over experts (so parity tests real routing)."""
    _, hf, _, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    seen: list[torch.Tensor] = []
    hook = hf.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with torch.no_grad():
        hf(ids)
    hook.remove()
    used = torch.unique(seen[0]).numel()
    assert used >= 6, f"only {used} experts used"


def test_greedy_generation_matches_hf(pair):
    case, hf, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, TINY["vocab_size"], (BATCH, PROMPT_LEN), generator=g)
    with torch.no_grad():
        ref = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )[:, PROMPT_LEN:].numpy()
    got = np.asarray(greedy_generate(ours, prompt.numpy(), NEW_TOKENS))
    np.testing.assert_array_equal(got, ref, err_msg=f"{case}: greedy tokens differ")


def test_cached_decode_matches_full_forward(pair):
    """Prefill + one-token steps through the MLA cache give the full-sequence logits.

    Same shapes as the logits and generation tests, so the jitted functions are compiled once.
    """
    _, _, ours, config = pair
    rng = np.random.default_rng(3)
    ids = rng.integers(0, config.vocab_size, (BATCH, SEQ_LEN), dtype=np.int32)
    full = np.asarray(jit_logits(ours)(ids))  # causal: positions < 40 see only the first 40 tokens
    graphdef, state = nnx.split(ours)
    cache = ours.init_cache(BATCH, PROMPT_LEN + NEW_TOKENS)
    last, cache = _cached_step(graphdef, state, jnp.asarray(ids[:, :PROMPT_LEN]), cache)
    got = [np.asarray(last)]
    for t in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS - 1):
        last, cache = _cached_step(graphdef, state, jnp.asarray(ids[:, t : t + 1]), cache)
        got.append(np.asarray(last))
    want = full[:, PROMPT_LEN - 1 : PROMPT_LEN + NEW_TOKENS - 1]
    np.testing.assert_allclose(np.stack(got, axis=1), want, atol=2e-5, rtol=0)


def test_v2_lite_param_count_matches_transformers():
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hub = copy.deepcopy(DEEPSEEK_V2_LITE)
    config = ModelConfig.from_hf(copy.deepcopy(hub))
    assert config.q_lora_rank is None and config.kv_lora_rank == 512 and config.rope_dim == 64
    assert config.moe_layers == tuple(range(1, 27))
    hf_config = DeepseekV2Config(
        **{k: v for k, v in hub.items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hf_config)
    expected = sum(p.numel() for p in hf.parameters())
    ours = build_model(config, abstract=True)
    assert param_count(ours) == expected == 15_706_484_224
    assert ours.layers[1].self_attn.scale == pytest.approx(
        hf.model.layers[1].self_attn.scaling, rel=1e-12
    )


def test_mlp_bias_refused():
    with pytest.raises(ConfigError, match="mlp_bias"):
        ModelConfig.from_hf({**DEEPSEEK_V2_LITE, "mlp_bias": True})
