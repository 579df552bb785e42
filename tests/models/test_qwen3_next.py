"""Qwen3-Next parity with Hugging Face transformers.

A tiny random-weight `Qwen3NextForCausalLM` with every feature on — Gated DeltaNet layers (two
value heads per key head, a width-4 causal convolution, decays and write strengths spread by
random `A_log` / `dt_bias`) beside gated full attention (partial rotary, zero-centred q/k norms),
zero-centred layer norms with non-zero weights, Qwen's softmax top-k MoE with a sigmoid-gated
shared expert and a dense layer (`mlp_only_layers`) — saved by transformers, plus a
multi-token-prediction head under `mtp.` as the hub ships it (skipped, as transformers skips it).
The reference for the recurrence is transformers' own (its chunked form in the forward pass, the
token loop when decoding with a cache).
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
from bitsmoe_jax.models.transformer import count_params  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[2],
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 40, 2, 12, 8

# Qwen/Qwen3-Next-80B-A3B-Instruct (and -Thinking) config.json as published.
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def _hf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(**TINY)
    config._attn_implementation = "eager"
    model = transformers.Qwen3NextForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name.endswith("linear_attn.norm.weight"):
                noise = noise + 1.0  # the gated norm's weight is not zero-centred
            elif name.endswith("A_log"):
                # decays exp(g) of 0.9–0.99 per token: the state remembers across the sequence
                noise = torch.log(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen))
            elif name.endswith("conv1d.weight"):
                noise = noise * 4
            p.copy_(noise)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("qwen3_next")
    model = _hf_model()
    model.save_pretrained(root)
    tensors = load_file(root / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(8, 8)  # the hub's multi-token-prediction head
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    ours, config = bitsmoe_jax.load_model(root)
    return model, ours, config


def test_config_parsed(pair):
    hf, _, config = pair
    assert config.model_type == "qwen3_next" and config.moe_layers == (0, 1, 3)
    assert [config.is_linear_attention(i) for i in range(4)] == [True, True, True, False]
    assert list(config.layer_types) == list(hf.config.layer_types)
    assert config.rope_dim == 8 and config.norm_offset == 1.0 and config.attn_output_gate


def test_logits_match_hf(pair):
    hf, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    with torch.no_grad():
        want = hf(ids).logits.float().numpy()
    got = np.asarray(jit_logits(ours)(ids.numpy()))
    assert np.abs(want).max() > 1.0, "degenerate test model: logits too small to mean anything"
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"max |logits diff| {diff:.3g}"


def test_greedy_generation_matches_hf(pair):
    """Prefill, then the recurrent state and convolution window carried token by token."""
    hf, ours, _ = pair
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
    np.testing.assert_array_equal(got, want, err_msg="greedy tokens differ")


def test_the_linear_layers_carry_information(pair):
    """The recurrence is exercised: a token early in the sequence changes the output of a linear
    layer many positions later (in transformers' model, the reference)."""
    hf, _, _ = pair
    ids = torch.randint(
        0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(5)
    )
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % TINY["vocab_size"]
    layer = hf.model.layers[0].linear_attn
    with torch.no_grad():
        emb = hf.model.embed_tokens
        a, b = layer(emb(ids)), layer(emb(other))
    assert float((a[0, -1] - b[0, -1]).abs().max()) > 1e-4


def test_released_config_builds_the_abstract_model():
    """Qwen3-Next-80B-A3B: transformers' exact parameter count (79.7B), and the active count."""
    config = ModelConfig.from_hf(copy.deepcopy(QWEN3_NEXT_80B))
    ours = count_params(build_model(config, abstract=True))
    kw = {
        k: v
        for k, v in QWEN3_NEXT_80B.items()
        if k
        not in ("architectures", "model_type", "rope_scaling", "torch_dtype", "use_sliding_window")
    }
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**kw))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert math.isclose(ours / 1e9, 79.7, abs_tol=0.05)  # the card: "80B in total"
    e_params = 3 * config.hidden_size * config.moe_intermediate_size
    active = (
        ours - len(config.moe_layers) * (config.num_experts - config.num_experts_per_tok) * e_params
    )
    # 3.87B with the embedding and output matrices, 3.25B without (the card's "3B activated")
    assert math.isclose(active / 1e9, 3.87, abs_tol=0.01)
    embeddings = 2 * config.vocab_size * config.hidden_size
    assert math.isclose((active - embeddings) / 1e9, 3.25, abs_tol=0.01)


def test_export_to_hf_round_trips(pair, tmp_path):
    """Our model written back as a Hugging Face checkpoint (`export_hf`: config.json from
    `to_hf`, the per-expert layout) loads in transformers with the original's logits."""
    from conversion.export_hf import export_hf

    hf, ours, config = pair
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
    export_hf(ours, config, tmp_path / "hf", dtype="float32")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(
        0, TINY["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(6)
    )
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), atol=1e-5)
