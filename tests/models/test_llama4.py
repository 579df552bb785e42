"""Llama 4 (text) parity with Hugging Face transformers, from text-only and image-text files.

A tiny random-weight `Llama4ForCausalLM` with every feature on — top-1 routing whose sigmoid score
scales the expert's *input*, a shared expert, dense and MoE layers interleaved (Maverick's
pattern), NoPE layers with position-tuned query temperature (a `floor_scale` small enough that the
scale grows inside the test sequence), chunked attention on the RoPE layers (8-token chunks),
weightless q/k norm after the interleaved-pair RoPE, llama3 frequency scaling — is saved by
transformers, and also rewritten the way the hub ships `meta-llama/Llama-4-*` (an image-text
checkpoint: the language model under `language_model.`, a vision tower beside it, the config's
`text_config`).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import bitsmoe_jax  # noqa: E402
from bitsmoe_jax.inference import greedy_generate, jit_logits  # noqa: E402
from bitsmoe_jax.models import ModelConfig, build_model  # noqa: E402
from bitsmoe_jax.models.config import ConfigError  # noqa: E402
from bitsmoe_jax.models.layers import rope_inv_freq  # noqa: E402
from bitsmoe_jax.models.transformer import count_params  # noqa: E402
from conversion.hf_checkpoint import HFCheckpoint  # noqa: E402
from tests.models.hub_configs import llama4_image_text_config as hub_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=48,  # the experts' (and shared expert's) width
    intermediate_size_mlp=96,  # the dense layers'
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=4,
    num_local_experts=8,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,  # layers 1 and 3 MoE (Maverick's pattern)
    attention_chunk_size=8,
    floor_scale=4,
    attn_scale=0.5,
    rope_parameters=LLAMA3_ROPE,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 40, 2, 12, 8

# meta-llama/Llama-4-Scout-17B-16E(-Instruct) and Llama-4-Maverick-17B-128E(-Instruct)
# config.json `text_config` as published on their cards (the `vision_config` omitted; the
# `no_rope_layers` / `moe_layers` lists are the defaults transformers derives, as written there).
SCOUT_TEXT = {
    "attention_bias": False,
    "attention_chunk_size": 8192,
    "attention_dropout": 0.0,
    "attn_scale": 0.1,
    "attn_temperature_tuning": True,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 5120,
    "initializer_range": 0.02,
    "interleave_moe_layer_step": 1,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "max_position_embeddings": 10485760,
    "model_type": "llama4_text",
    "num_attention_heads": 40,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "pad_token_id": 200018,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_qk_norm": True,
    "vocab_size": 202048,
}
MAVERICK_TEXT = {
    **SCOUT_TEXT,
    "interleave_moe_layer_step": 2,
    "max_position_embeddings": 1048576,
    "num_local_experts": 128,
    "rope_scaling": None,
    "use_qk_norm": False,
}


def _hf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(**TINY)
    config._attn_implementation = "eager"
    model = transformers.Llama4ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name.endswith("norm.weight"):
                noise = noise + 1.0
            p.copy_(noise)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(text-only dir as transformers saves it, image-text hub-style dir), HF model."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("llama4")
    model = _hf_model()
    model.save_pretrained(root / "text")
    state = load_file(root / "text" / "model.safetensors")
    hub = {f"language_model.{k}": v for k, v in state.items()}
    hub["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 4)
    hub["multi_modal_projector.linear_1.weight"] = torch.zeros(4, 8)
    (root / "hub").mkdir()
    save_file(hub, root / "hub" / "model.safetensors", metadata={"format": "pt"})
    text_cfg = json.loads((root / "text" / "config.json").read_text())
    (root / "hub" / "config.json").write_text(json.dumps(hub_config(text_cfg)))
    return root / "text", root / "hub", model


@pytest.fixture(scope="module", params=["text_only", "image_text_hub"])
def pair(request, dirs):
    text, hub, model = dirs
    ours, config = bitsmoe_jax.load_model(text if request.param == "text_only" else hub)
    return request.param, model, ours, config


def test_config_parsed(pair):
    _, hf, _, config = pair
    assert config.model_type == "llama4_text" and config.moe_layers == (1, 3)
    assert [config.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert [config.chunk_of(i) for i in range(4)] == [8, 8, 8, None]
    assert list(config.layer_types) == list(hf.config.layer_types)
    assert config.router_scales_input and config.qk_l2_norm and config.attn_temperature_tuning
    assert (config.intermediate_size, config.moe_intermediate_size) == (96, 48)


def test_logits_match_hf(pair):
    case, hf, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    with torch.no_grad():
        want = hf(ids).logits.float().numpy()
    got = np.asarray(jit_logits(ours)(ids.numpy()))
    assert np.abs(want).max() > 1.0, "degenerate test model: logits too small to mean anything"
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"{case}: max |logits diff| {diff:.3g}"


def test_greedy_generation_matches_hf(pair):
    """Cached decoding crosses chunk boundaries (8) and temperature steps (floor 4)."""
    case, hf, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, TINY["vocab_size"], (BATCH, PROMPT_LEN), generator=g)
    with torch.no_grad():
        want = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )[:, PROMPT_LEN:].numpy()
    got = np.asarray(greedy_generate(ours, prompt.numpy(), NEW_TOKENS))
    np.testing.assert_array_equal(got, want, err_msg=f"{case}: greedy tokens differ")


def test_features_are_exercised(dirs):
    """Each feature changes the logits: switching it off in transformers' model moves them."""
    _, _, model = dirs
    ids = torch.randint(
        0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        base = model(ids).logits
        for attr, off in (("attn_temperature_tuning", False), ("use_qk_norm", False)):
            variant = copy.deepcopy(model)
            for layer in variant.model.layers:
                if attr == "use_qk_norm" and hasattr(layer.self_attn, "qk_norm"):
                    del layer.self_attn.qk_norm
                else:
                    setattr(layer.self_attn, attr, off)
            assert (variant(ids).logits - base).abs().max() > 1e-3, attr
    with torch.no_grad():
        scores, _ = model.model.layers[1].feed_forward.router(torch.randn(256, TINY["hidden_size"]))
    top = scores.max(dim=1).values
    # the input scaling matters: scores spread inside (0, 1), not saturated at 1
    assert 0.5 < float(top.mean()) < 0.95 and float(top.std()) > 0.03, top


def test_vision_tensors_are_skipped_and_named(dirs):
    _, hub, _ = dirs
    ckpt = HFCheckpoint(hub)
    assert sorted(ckpt.skipped) == [
        "multi_modal_projector.linear_1.weight",
        "vision_model.patch_embedding.linear.weight",
    ]
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in ckpt
    assert ckpt.shape("lm_head.weight") == (TINY["vocab_size"], TINY["hidden_size"])


def test_llama3_frequencies_equal_transformers():
    """Our llama3 RoPE frequencies against transformers' own function, for Llama 3.1's factors
    (every band: kept, blended, divided) and for Scout's (low = high, where the blend would
    divide by zero)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for scaling in (
        {**LLAMA3_ROPE, "original_max_position_embeddings": 8192},
        {**SCOUT_TEXT["rope_scaling"], "rope_theta": 500000.0},
    ):
        kw = {**TINY, "rope_parameters": scaling, "max_position_embeddings": 131072}
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.Llama4TextConfig(**kw))
        ours = ModelConfig.from_hf({**kw, "model_type": "llama4_text"})
        got, scale = rope_inv_freq(ours)
        assert scale == 1.0
        # torch and numpy round base ** (2j/d) differently in the last bit
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)


def test_the_fp8_release_is_refused_by_name():
    """Maverick's `-FP8` repo (compressed-tensors, in the outer image-text config): refused as
    already quantized, not read as bf16."""
    cfg = hub_config(MAVERICK_TEXT)
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    with pytest.raises(ConfigError, match="already quantized.*compressed-tensors"):
        ModelConfig.from_hf(cfg)


def test_top_k_above_one_is_refused():
    with pytest.raises(ConfigError, match="num_experts_per_tok 2.*top-1"):
        ModelConfig.from_hf({**SCOUT_TEXT, "num_experts_per_tok": 2})


@pytest.mark.parametrize(
    "text,billions", [(SCOUT_TEXT, 107.8), (MAVERICK_TEXT, 400.7)], ids=["scout", "maverick"]
)
def test_released_configs_build_abstract_models(text, billions):
    """Llama-4-Scout-17B-16E / Maverick-17B-128E, from their image-text config.json: transformers'
    exact parameter count of the language model (the cards' 109B / 400B totals include the vision
    tower), and 17B active parameters per token."""
    config = ModelConfig.from_hf(hub_config(text))
    ours = count_params(build_model(config, abstract=True))
    kw = {k: v for k, v in text.items() if k not in ("model_type", "rope_scaling")}
    if text["rope_scaling"]:
        kw["rope_parameters"] = {**text["rope_scaling"], "rope_theta": text["rope_theta"]}
    with torch.device("meta"):
        hf = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**kw))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert math.isclose(ours / 1e9, billions, abs_tol=0.05)
    e_params = 3 * config.hidden_size * config.moe_intermediate_size
    active = ours - len(config.moe_layers) * (config.num_experts - 1) * e_params
    assert math.isclose(active / 1e9, 17.2, abs_tol=0.1)
