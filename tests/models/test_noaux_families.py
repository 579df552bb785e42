"""DeepSeek-V3 / R1 / Kimi-K2 and GLM-4.5 parity with Hugging Face transformers, from hub-style
FP8 files.

Tiny random-weight `DeepseekV3ForCausalLM` and `Glm4MoeForCausalLM` models with every feature
their releases use switched on — sigmoid routing with a learned correction bias, group-limited
top-k, normalised and scaled weights, dense first layers, shared experts; MLA with low-rank query,
YaRN and interleaved RoPE (V3); GQA with biases, q/k norm and partial rotary (GLM) — are written as
the hub ships them (`hub_files.write_fp8_hub_checkpoint`: fp8 e4m3 linear weights with block scales,
a multi-token-prediction layer, two shards; Kimi-K2's `model_type`; one fused-layout copy) and
loaded with `bitsmoe_jax.load_model`. The reference is transformers' model holding the weights the
FP8 files represent, dequantized by torch. The released configs (written from the public model
cards) build abstract models whose parameter counts equal transformers' on the meta device.
"""

from __future__ import annotations

import copy

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
from bitsmoe_jax.models.transformer import count_params  # noqa: E402
from conversion.hf_checkpoint import CheckpointError, HFCheckpoint  # noqa: E402
from tests.models.hub_configs import HUB_CONFIGS, PUBLISHED_BILLIONS  # noqa: E402
from tests.models.hub_files import write_fp8_hub_checkpoint  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=40,  # not a multiple of the fp8 block: partial blocks are exercised
    num_hidden_layers=3,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
CASES = {
    # DeepSeek-V3/R1: low-rank query, YaRN (mscale_all_dim), interleaved RoPE, 4 groups keep 2.
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_group=4,
            topk_group=2,
            max_position_embeddings=163840,
            rope_parameters=dict(YARN),
            rope_interleave=True,
        ),
        dict(model_type=None, fused=False),
    ),
    # Kimi-K2: the V3 architecture under model_type kimi_k2, one group, no interleave flag off.
    "kimi_k2": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_group=1,
            topk_group=1,
            max_position_embeddings=131072,
            rope_parameters={**YARN, "rope_theta": 50000.0, "factor": 32.0, "beta_fast": 1},
            rope_interleave=True,
        ),
        dict(model_type="kimi_k2", fused=False),
    ),
    # DeepSeek-V3 with rope_interleave false (rotate_half) and the experts in the fused layout.
    "deepseek_v3_fused": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_group=2,
            topk_group=1,
            rope_interleave=False,
        ),
        dict(model_type=None, fused=True),
    ),
    # GLM-4.5: GQA 8 heads / 2 kv heads, head_dim 24 != 64/8, q/k/v biases, q/k norm, half rotary.
    "glm4_moe": (
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=24,
            attention_bias=True,
            use_qk_norm=True,
            n_group=2,
            topk_group=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "partial_rotary_factor": 0.5,
            },
            rms_norm_eps=1e-5,
        ),
        dict(model_type=None, fused=False),
    ),
}
BLOCK = (16, 32)  # block scales over 16 rows × 32 columns: non-square, partial at the edges
SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 48, 2, 16, 8


def _hf_model(case: str) -> torch.nn.Module:
    model_cls, config_cls, extra, _ = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **copy.deepcopy(extra))
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.08
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a learned bias that moves the choice
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    case = request.param
    _, _, _, how = CASES[case]
    root = tmp_path_factory.mktemp(case)
    write_fp8_hub_checkpoint(
        _hf_model(case),
        root / "hub",
        root / "reference",
        block=BLOCK,
        model_type=how["model_type"],
        fused=how["fused"],
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        root / "reference", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours, config = bitsmoe_jax.load_model(root / "hub")
    return case, root / "hub", ref, ours, config


def test_hub_files_are_fp8_with_block_scales(pair):
    """The test's checkpoint really is what the hub ships (fp8 weights, scales, an MTP layer)."""
    _, hub, _, _, config = pair
    ckpt = HFCheckpoint(hub)
    keys = ckpt.keys()
    assert not any(k.endswith("_scale_inv") for k in keys)  # scales travel with their weights
    assert len(ckpt._scales) > 10
    assert any(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in keys)
    st = ckpt._open(ckpt.file_of("model.layers.1.self_attn.o_proj.weight"))
    assert str(st.entries["model.layers.1.self_attn.o_proj.weight"][0]) == "float8_e4m3fn"


def test_config_parsed(pair):
    case, _, ref, _, config = pair
    assert config.model_type == ("glm4_moe" if case == "glm4_moe" else "deepseek_v3")
    assert config.router_scoring == "sigmoid" and config.topk_method == "noaux_tc"
    assert config.moe_layers == (1, 2) and config.num_nextn_predict_layers == 1
    assert config.n_group == ref.config.n_group and config.topk_group == ref.config.topk_group
    if case == "glm4_moe":
        assert config.rope_dim == 12 and config.qk_norm and config.attention_bias


def test_logits_match_hf(pair):
    case, _, ref, ours, _ = pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ_LEN), generator=g)
    with torch.no_grad():
        want = ref(ids).logits.float().numpy()
    got = np.asarray(jit_logits(ours)(ids.numpy()))
    assert np.abs(want).max() > 1.0, "degenerate test model: logits too small to mean anything"
    diff = float(np.abs(got - want).max())
    assert diff <= 1e-4, f"{case}: max |logits diff| {diff:.3g}"


def test_routing_uses_the_bias_and_groups(pair):
    """The correction bias changes which experts are chosen (so parity tests it), and with
    topk_group < n_group every token's experts come from topk_group groups only."""
    case, _, ref, _, config = pair
    gate = ref.model.layers[1].mlp.gate
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, COMMON["hidden_size"], generator=g)
    with torch.no_grad():
        _, _, idx = gate(x)
        saved = gate.e_score_correction_bias.clone()
        gate.e_score_correction_bias.zero_()
        _, _, idx0 = gate(x)
        gate.e_score_correction_bias.copy_(saved)
    assert (idx.sort().values != idx0.sort().values).any(dim=-1).float().mean() > 0.05
    assert torch.unique(idx).numel() >= 6
    if config.topk_group < config.n_group:
        groups = idx // (config.num_experts // config.n_group)
        assert max(len(set(row.tolist())) for row in groups) <= config.topk_group


def test_greedy_generation_matches_hf(pair):
    case, _, ref, ours, _ = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, COMMON["vocab_size"], (BATCH, PROMPT_LEN), generator=g)
    with torch.no_grad():
        want = ref.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )[:, PROMPT_LEN:].numpy()
    got = np.asarray(greedy_generate(ours, prompt.numpy(), NEW_TOKENS))
    np.testing.assert_array_equal(got, want, err_msg=f"{case}: greedy tokens differ")


def test_router_bias_stays_float32_in_a_bf16_model(pair):
    _, hub, _, _, _ = pair
    import jax.numpy as jnp

    model, _ = bitsmoe_jax.load_model(hub, dtype=jnp.bfloat16)
    router = model.layers[1].mlp.router
    assert router.kernel[...].dtype == jnp.bfloat16
    assert router.e_score_correction_bias[...].dtype == jnp.float32


# ------------------------------------------------------------------------------- bad FP8 files
def _copy_hub(src, dst, edit):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    by_shard: dict[str, dict] = {}
    for shard in sorted(set(index["weight_map"].values())):
        by_shard[shard] = load_file(dst / shard)
    edit(by_shard, index)
    for shard, tensors in by_shard.items():
        save_file(tensors, dst / shard)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def v3_hub(tmp_path_factory):
    """A DeepSeek-V3 FP8 checkpoint the bad-file cases copy and break."""
    root = tmp_path_factory.mktemp("v3_bad_files")
    write_fp8_hub_checkpoint(_hf_model("deepseek_v3"), root / "hub", root / "ref", block=BLOCK)
    return root / "hub"


def test_missing_scale_is_named(v3_hub, tmp_path):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"

    def drop(shards, index):
        for t in shards.values():
            t.pop(key + "_scale_inv", None)
        index["weight_map"].pop(key + "_scale_inv")

    _copy_hub(v3_hub, tmp_path / "m", drop)
    with pytest.raises(CheckpointError, match=f"{key}.*without its block scale"):
        HFCheckpoint(tmp_path / "m")


def test_scale_of_the_wrong_block_shape_is_named(v3_hub, tmp_path):
    key = "model.layers.2.self_attn.kv_b_proj.weight_scale_inv"

    def widen(shards, index):
        for t in shards.values():
            if key in t:
                t[key] = torch.ones(t[key].shape[0] + 1, t[key].shape[1])

    _copy_hub(v3_hub, tmp_path / "m", widen)
    with pytest.raises(CheckpointError, match=f"block scale '{key}' has shape .*16x32 blocks"):
        HFCheckpoint(tmp_path / "m")


def test_nan_scale_is_found_by_the_preflight_check(v3_hub, tmp_path):
    from conversion.preflight import preflight

    key = "model.layers.2.mlp.experts.5.down_proj.weight"

    def poison(shards, index):
        for t in shards.values():
            if key + "_scale_inv" in t:
                t[key + "_scale_inv"][0, 0] = float("nan")

    _copy_hub(v3_hub, tmp_path / "m", poison)
    config = ModelConfig.from_hf_dir(tmp_path / "m")
    with pytest.raises(CheckpointError, match=f"{key}.*NaN or Inf"):
        preflight(tmp_path / "m", config, check_values=True, progress=False)


def test_already_quantized_checkpoints_are_refused():
    hub = copy.deepcopy(HUB_CONFIGS["deepseek-ai/DeepSeek-V3"])
    hub["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ConfigError, match="already quantized.*gptq"):
        ModelConfig.from_hf(hub)


def test_other_routers_are_refused():
    hub = copy.deepcopy(HUB_CONFIGS["deepseek-ai/DeepSeek-V3"])
    hub["scoring_func"] = "softmax"
    with pytest.raises(ConfigError, match="noaux_tc with sigmoid"):
        ModelConfig.from_hf(hub)


# ------------------------------------------------------------------------- the released models
@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_released_configs_build_abstract_models(name):
    """Each released config.json loads, builds the abstract model with `jax.eval_shape`, and has
    exactly transformers' parameter count, within 3% of the model card's total (MTP layers, which
    the causal LM does not hold, make GLM's published totals slightly larger)."""
    hub = copy.deepcopy(HUB_CONFIGS[name])
    config = ModelConfig.from_hf(copy.deepcopy(hub))
    model = build_model(config, abstract=True)
    ours = count_params(model)
    cls = "Glm4MoeConfig" if hub["model_type"] == "glm4_moe" else "DeepseekV3Config"
    model_cls = "Glm4MoeForCausalLM" if hub["model_type"] == "glm4_moe" else "DeepseekV3ForCausalLM"
    kw = {k: v for k, v in hub.items() if k not in ("architectures", "model_type", "auto_map")}
    kw.pop("quantization_config", None)
    hf_config = getattr(transformers, cls)(**kw)
    with torch.device("meta"):
        hf = getattr(transformers, model_cls)(hf_config)
    # transformers holds the correction bias as a buffer; we count it as the parameter it is
    expected = sum(p.numel() for p in hf.parameters()) + sum(
        b.numel() for n, b in hf.named_buffers() if n.endswith("e_score_correction_bias")
    )
    assert ours == expected
    assert abs(ours / 1e9 / PUBLISHED_BILLIONS[name] - 1) < 0.03, ours
    assert config.moe_layers[0] == hub["first_k_dense_replace"]
    assert len(config.moe_layers) == hub["num_hidden_layers"] - hub["first_k_dense_replace"]
