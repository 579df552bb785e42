"""GPT-OSS parity with Hugging Face transformers, from its bf16 layout and from MXFP4 files.

A tiny random-weight `GptOssForCausalLM` with every feature on — router and expert biases, the
clamped SwiGLU (a limit small enough that a third of the activations clamp), attention sinks,
q/k/v/o biases, alternating sliding-window (8 tokens) and full layers, YaRN without truncation — is
saved by transformers (fused experts, gate/up interleaved) and also written as the hub ships
`openai/gpt-oss-*`: experts as MXFP4 `*_blocks` + `*_scales` (encoded here with torch). The
reference for the MXFP4 files is transformers' model holding the weights transformers' own MXFP4
decoder (`convert_moe_packed_tensors`) reads from them.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

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
from conversion.hf_checkpoint import CheckpointError, HFCheckpoint  # noqa: E402
from tests.models.hub_files import encode_mxfp4  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_hidden_layers=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=8,
    swiglu_limit=0.5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
SEQ_LEN, BATCH, PROMPT_LEN, NEW_TOKENS = 40, 2, 12, 8

# openai/gpt-oss-20b and -120b config.json as published (without the layer_types list, which
# alternates sliding and full starting with sliding, as transformers' default).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}
GPT_OSS_120B = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128}


def _hf_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**TINY)
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.08
            if name.endswith("norm.weight"):
                noise = noise + 1.0
            elif name.endswith("sinks"):
                noise = noise * 20  # sinks that take a real share of the attention
            p.copy_(noise)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(bf16-layout dir, MXFP4 hub dir, reference dir holding the MXFP4 weights decoded by
    transformers), HF model of the bf16 layout."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("gpt_oss")
    model = _hf_model()
    model.save_pretrained(root / "plain")
    state = load_file(root / "plain" / "model.safetensors")
    hub, ref = {}, {}
    for k, v in state.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = encode_mxfp4(v)
            hub[k + "_blocks"], hub[k + "_scales"] = blocks, scales
            ref[k] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            hub[k] = v.to(torch.bfloat16)
            ref[k] = hub[k].float()
    for name, tensors in (("hub", hub), ("reference", ref)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(root / "plain" / "config.json", root / name / "config.json")
    cfg = json.loads((root / "hub" / "config.json").read_text())
    cfg["quantization_config"] = copy.deepcopy(GPT_OSS_20B["quantization_config"])
    (root / "hub" / "config.json").write_text(json.dumps(cfg))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        root / "reference", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return root / "plain", root / "hub", model, reference


@pytest.fixture(scope="module", params=["bf16_layout", "mxfp4"])
def pair(request, dirs):
    plain, hub, model, reference = dirs
    if request.param == "bf16_layout":
        ours, config = bitsmoe_jax.load_model(plain)
        return request.param, model, ours, config
    ours, config = bitsmoe_jax.load_model(hub)
    return request.param, reference, ours, config


def test_config_parsed(pair):
    _, hf, _, config = pair
    assert config.model_type == "gpt_oss" and config.moe_layers == (0, 1, 2, 3)
    assert [config.window_of(i) for i in range(4)] == [8, None, 8, None]
    assert list(config.layer_types) == list(hf.config.layer_types)
    assert config.expert_bias and config.router_bias and config.attention_sinks
    assert dict(config.rope_scaling)["truncate"] is False


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


def test_features_are_exercised(dirs):
    """The clamp bites, the sinks take weight, and the window is shorter than the sequence."""
    _, _, model, _ = dirs
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(512, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    clamped = (gate_up[:, 0::2] > TINY["swiglu_limit"]).float().mean()
    assert 0.1 < clamped < 0.9
    assert model.model.layers[0].self_attn.sinks.abs().max() > 1.0
    assert TINY["sliding_window"] < SEQ_LEN


def test_greedy_generation_matches_hf(pair):
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


def test_mxfp4_reader_equals_transformers_decoder(dirs):
    """Every expert tensor of the MXFP4 files, whole and as expert rows, equals transformers'."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    _, hub, _, _ = dirs
    raw = load_file(hub / "model.safetensors")
    ckpt = HFCheckpoint(hub)
    names = [k for k in ckpt.keys() if k.endswith(("gate_up_proj", "down_proj"))]
    assert len(names) == 2 * TINY["num_hidden_layers"]
    for k in names:
        want = convert_moe_packed_tensors(
            raw[k + "_blocks"], raw[k + "_scales"], dtype=torch.float32
        ).numpy()
        assert ckpt.shape(k) == want.shape
        np.testing.assert_array_equal(ckpt.get(k), want)
        np.testing.assert_array_equal(ckpt.get_rows(k, 3, 6), want[3:6])


def test_mxfp4_scales_of_the_wrong_shape_are_named(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, hub, _, _ = dirs
    shutil.copytree(hub, tmp_path / "m")
    t = load_file(tmp_path / "m" / "model.safetensors")
    key = "model.layers.2.mlp.experts.down_proj_scales"
    t[key] = t[key][:, :, :1].contiguous()
    save_file(t, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="down_proj_blocks.*down_proj_scales"):
        HFCheckpoint(tmp_path / "m")


@pytest.mark.parametrize(
    "hub,billions", [(GPT_OSS_20B, 20.9), (GPT_OSS_120B, 116.8)], ids=["20b", "120b"]
)
def test_released_configs_build_abstract_models(hub, billions):
    """openai/gpt-oss-20b / -120b: transformers' exact parameter count, and the model card's
    total (20.9B, 116.8B)."""
    config = ModelConfig.from_hf(copy.deepcopy(hub))
    ours = count_params(build_model(config, abstract=True))
    kw = {k: v for k, v in hub.items() if k not in ("architectures", "model_type")}
    kw.pop("quantization_config")
    with torch.device("meta"):
        hf = transformers.GptOssForCausalLM(transformers.GptOssConfig(**kw))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert math.isclose(ours / 1e9, billions, abs_tol=0.05)


def test_baselines_without_its_activation_are_refused(dirs, tmp_path, capsys):
    """GPTQ's Hessians assume silu(g)·u experts: one error line before any work, nothing
    written."""
    from bitsmoe_jax import quantize
    from tests.run.tiny_mixtral import TINY_CONFIG

    plain, _, _, _ = dirs
    out = tmp_path / "out"
    code = quantize.main(
        [
            "--config",
            TINY_CONFIG,
            f"--config.model_path={plain}",
            f"--config.output_dir={out}",
            "--config.method=gptq",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "biased, clamped" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))


def test_activation_derivatives_equal_autodiff():
    """The loss weights' ∂h/∂g, ∂h/∂u of both activations against jax.grad."""
    import jax.numpy as jnp

    from bitsmoe_jax.models.moe import SWIGLU, GluActivation

    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.normal(0, 3, 4096), jnp.float32)
    u = jnp.asarray(rng.normal(0, 3, 4096), jnp.float32)
    for act in (SWIGLU, GluActivation(7.0 / 3, 1.702)):
        h, dg, du = act.with_grads(g, u)
        np.testing.assert_allclose(h, act(g, u), rtol=1e-6, atol=1e-6)
        grad_g = jax.vmap(jax.grad(act))(g, u)
        grad_u = jax.vmap(jax.grad(act, argnums=1))(g, u)
        np.testing.assert_allclose(dg, grad_g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(du, grad_u, rtol=1e-5, atol=1e-6)
    clamped = GluActivation(7.0 / 3, 1.702).with_grads(g, u)
    assert (np.asarray(clamped[1]) == 0).mean() > 0.1  # the clamp bites in this sample
