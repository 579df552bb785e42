"""Real model sizes: the abstract Flax model has exactly the parameter count transformers computes.

The config dicts are the published hub `config.json` values (transformers 4.x spellings:
`rope_theta`, `num_experts` for Qwen3-MoE, `torch_dtype`, ...). transformers builds the same models
on the meta device (no memory) and counts their parameters: that count is the independent reference.
The transformers-5 spellings (`rope_parameters`, `num_local_experts`) are checked to parse to the
same `ModelConfig`.
"""

from __future__ import annotations

import copy

import pytest

from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import build_model, count_params

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# mistralai/Mixtral-8x7B-v0.1 config.json
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}

# Qwen/Qwen1.5-MoE-A2.7B config.json
QWEN15_MOE_A27B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen/Qwen3-30B-A3B config.json
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

REAL = {
    "Mixtral-8x7B": (MIXTRAL_8X7B, "MixtralConfig", "MixtralForCausalLM", (46.6e9, 46.8e9)),
    "Qwen1.5-MoE-A2.7B": (
        QWEN15_MOE_A27B,
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        (14.2e9, 14.4e9),
    ),
    "Qwen3-30B-A3B": (QWEN3_30B_A3B, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", (30.4e9, 30.6e9)),
}


def _hf_meta_param_count(hub: dict, config_cls: str, model_cls: str) -> int:
    cfg = getattr(transformers, config_cls)(**{k: v for k, v in hub.items() if k != "model_type"})
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(REAL))
def test_param_count_equals_transformers(name):
    hub, config_cls, model_cls, (lo, hi) = REAL[name]
    cfg = ModelConfig.from_hf(copy.deepcopy(hub), source=name)
    ours = count_params(build_model(cfg, abstract=True))
    ref = _hf_meta_param_count(hub, config_cls, model_cls)
    assert ours == ref, (
        f"{name}: Flax {ours:,} params != transformers {ref:,} (diff {ours - ref:+,})"
    )
    # and the published total (46.7B, 14.3B, 30.5B) as a sanity check on the reference itself
    assert lo < ref < hi, f"{name}: {ref:,}"


def test_real_configs_parse_as_published():
    m = ModelConfig.from_hf(MIXTRAL_8X7B)
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.head_dim) == (
        8,
        2,
        14336,
        128,
    )
    assert m.rope_theta == 1e6 and m.sliding_window is None and m.moe_layers == tuple(range(32))
    q2 = ModelConfig.from_hf(QWEN15_MOE_A27B)
    assert (q2.num_experts, q2.num_experts_per_tok, q2.shared_expert_intermediate_size) == (
        60,
        4,
        5632,
    )
    assert q2.attention_bias and not q2.norm_topk_prob and q2.sliding_window is None
    assert q2.rope_theta == 1e6 and q2.moe_layers == tuple(range(24))
    q3 = ModelConfig.from_hf(QWEN3_30B_A3B)
    assert (q3.num_experts, q3.num_experts_per_tok, q3.moe_intermediate_size, q3.head_dim) == (
        128,
        8,
        768,
        128,
    )
    assert q3.qk_norm and not q3.attention_bias and q3.norm_topk_prob and q3.rope_theta == 1e6
    assert q3.num_key_value_heads == 4 and q3.moe_layers == tuple(range(48))


def _transformers5_spelling(hub: dict) -> dict:
    """The same config as transformers 5 writes it: rope_parameters, num_local_experts, dtype."""
    d = copy.deepcopy(hub)
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
    d.pop("rope_scaling", None)
    d["dtype"] = d.pop("torch_dtype")
    if "num_experts" in d:
        d["num_local_experts"] = d.pop("num_experts")
    return d


@pytest.mark.parametrize("name", list(REAL))
def test_transformers5_spellings_parse_identically(name):
    hub = REAL[name][0]
    d5 = _transformers5_spelling(hub)
    assert "rope_theta" not in d5 and "num_experts" not in d5
    assert ModelConfig.from_hf(d5) == ModelConfig.from_hf(hub)


@pytest.mark.parametrize("name", list(REAL))
def test_transformers5_saved_config_parses_identically(name, tmp_path):
    """What transformers 5 itself writes for the published config (save_pretrained) parses the
    same."""
    hub, config_cls, _, _ = REAL[name]
    cfg = getattr(transformers, config_cls)(**{k: v for k, v in hub.items() if k != "model_type"})
    cfg.save_pretrained(tmp_path)
    assert ModelConfig.from_hf_dir(tmp_path) == ModelConfig.from_hf(hub)
