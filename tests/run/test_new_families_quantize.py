"""End to end on the newest families: `python -m bitsmoe_jax.quantize` on tiny DeepSeek-V3,
GLM-4.5, GPT-OSS and Llama 4 models stored as the hub ships them (DeepSeek/GLM: fp8 e4m3
block-scaled, an MTP layer, two shards; GPT-OSS: MXFP4 experts with bf16 biases, its clamp biting
on a fifth of the activations; Llama 4: an image-text bf16 checkpoint, input-scaling top-1 router,
a chunked RoPE layer and a NoPE layer).

Independent references: the quantized model's KL to the unquantized one (the weights the FP8 files
hold) against round-to-nearest 2-bit with a scale per 32 weights (`apply_rtn`: 2.5 bpw, the same
budget), both measured here with `evaluate_model` on the same tokens; the router's correction
bias read back from the written files equals the checkpoint's float32 bias bit for bit; the bits
of every stored array recounted.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bitsmoe_jax import quantize  # noqa: E402
from bitsmoe_jax.baselines.rtn import apply_rtn  # noqa: E402
from bitsmoe_jax.evaluate import evaluate_model  # noqa: E402
from bitsmoe_jax.io.checkpoint import load_tree  # noqa: E402
from bitsmoe_jax.io.data import load_tokenizer, read_text, tokenize_text  # noqa: E402
from bitsmoe_jax.loading import load_model  # noqa: E402
from conversion.hf_checkpoint import HFCheckpoint  # noqa: E402
from tests.models.hub_files import encode_mxfp4, write_fp8_hub_checkpoint  # noqa: E402
from tests.run.tiny_mixtral import REF_TOKENIZER, SEQ, VOCAB, base_args  # noqa: E402

BUDGET = 2.5
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=192,
    moe_intermediate_size=96,
    num_hidden_layers=2,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
LLAMA4_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=96,
    intermediate_size_mlp=192,
    num_hidden_layers=2,
    num_experts_per_tok=1,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
QWEN3_NEXT_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=192,
    moe_intermediate_size=96,
    shared_expert_intermediate_size=96,
    num_hidden_layers=2,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
GPT_OSS_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
FAMILIES = {
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_local_experts=8,
            sliding_window=16,
            swiglu_limit=0.7,
        ),
    ),
    "llama4_text": (
        "Llama4ForCausalLM",
        "Llama4TextConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_local_experts=8,
            interleave_moe_layer_step=2,
            no_rope_layers=[1, 0],  # a chunked RoPE layer, then a NoPE layer
            attention_chunk_size=16,
            floor_scale=16,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=True,
            use_qk_norm=True,
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    model_cls, config_cls, extra = FAMILIES[name]
    torch.manual_seed(0)
    common = {
        "gpt_oss": GPT_OSS_COMMON,
        "llama4_text": LLAMA4_COMMON,
        "qwen3_next": QWEN3_NEXT_COMMON,
    }.get(name, COMMON)
    config = getattr(transformers, config_cls)(**common, **extra)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen) * 0.05
            zero_centred = name == "qwen3_next" and not pname.endswith("linear_attn.norm.weight")
            if pname.endswith("norm.weight") and not zero_centred:
                noise = noise + 1.0
            elif pname.endswith("A_log"):  # per-token decays of 0.9–0.99
                noise = torch.log(torch.empty(p.shape).uniform_(0.02, 0.2, generator=gen))
            p.copy_(noise)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    root = tmp_path_factory.mktemp(name)
    hub = root / "hub"
    if name == "gpt_oss":
        write_mxfp4_hub_checkpoint(model, hub)
    elif name == "llama4_text":
        write_image_text_hub_checkpoint(model, hub)
    elif name == "qwen3_next":
        write_bf16_hub_checkpoint(model, hub)
    else:
        write_fp8_hub_checkpoint(model, hub, root / "reference", block=(32, 64))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REF_TOKENIZER / f, hub / f)
    calib = root / "calib.txt"
    calib.write_text(read_text("shakespeare_train")[:60_000])
    out = root / "out"
    code = quantize.main(
        base_args(hub, out, calib, f"--config.budget_bits={BUDGET}", "--config.eval_text=")
    )
    assert code == 0
    return name, hub, out


def test_kl_is_finite_and_below_rtn(family):
    name, hub, out = family
    tokens = tokenize_text(load_tokenizer(hub), read_text("shakespeare_test"))[:2048]
    ref, _ = load_model(hub)
    quant, _ = load_model(out)
    rtn, _ = load_model(hub)
    rtn_bpw = apply_rtn(rtn, bits=2, group_size=32)  # 2.5 bpw: the same budget
    ours = evaluate_model(quant, tokens, SEQ, SEQ, batch_size=8, reference=ref)
    base = evaluate_model(rtn, tokens, SEQ, SEQ, batch_size=8, reference=ref)
    report = json.loads((out / "report.json").read_text())
    print(
        f"{name}: BitsMoE {report['effective_bpw_experts']:.3f} bpw KL {ours['kl_divergence']:.5f}"
        f" | RTN2 g32 {rtn_bpw:.3f} bpw KL {base['kl_divergence']:.5f}"
    )
    assert report["effective_bpw_experts"] <= BUDGET + 1e-9 and rtn_bpw == pytest.approx(BUDGET)
    assert np.isfinite(ours["kl_divergence"]) and ours["kl_divergence"] > 0
    assert ours["kl_divergence"] < base["kl_divergence"]


def _dense(part) -> dict:
    """The dense (unquantized) arrays of a written part: the top tree, or a layer's `dense`."""
    tree = load_tree(part)
    return tree if part.name == "top" else tree["dense"]


# the families whose routers choose with a selection bias (`e_score_correction_bias`)
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"], indirect=True)
def test_router_bias_is_written_exactly(family):
    name, hub, out = family
    want = HFCheckpoint(hub).get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert want.dtype == np.float32
    got = np.asarray(
        _dense(out / "params" / "layer_001")["mlp"]["router"]["e_score_correction_bias"]
    )
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_dense_bits_count_the_float32_bias(family):
    """effective_bpw_model counts every stored dense array at its stored width (bias: 32 bits)."""
    _, _, out = family
    report = json.loads((out / "report.json").read_text())
    parts = [  # (the groups of experts' packed factors hold no dense arrays)
        _dense(p) for p in sorted((out / "params").iterdir()) if not p.name.endswith("_experts")
    ]
    bits = sum(np.asarray(a).nbytes * 8 for t in parts for a in jax.tree.leaves(t))
    params = sum(np.asarray(a).size for t in parts for a in jax.tree.leaves(t))
    want = (report["expert_stored_bits"] + bits) / (report["expert_weights"] + params)
    assert report["effective_bpw_model"] == pytest.approx(want, rel=1e-12)


def write_mxfp4_hub_checkpoint(model, out_dir) -> None:
    """`model` as openai/gpt-oss-* ships: experts MXFP4, everything else bf16."""
    from safetensors.torch import load_file, save_file

    plain = out_dir.parent / "plain"
    model.save_pretrained(plain)
    tensors = {}
    for k, v in load_file(plain / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[k + "_blocks"], tensors[k + "_scales"] = encode_mxfp4(v)
        else:
            tensors[k] = v.to(torch.bfloat16)
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (out_dir / "config.json").write_text(json.dumps(cfg))


def write_bf16_hub_checkpoint(model, out_dir) -> None:
    """`model` (Qwen3NextForCausalLM) as Qwen/Qwen3-Next-* ships: bf16, per-expert tensors, a
    multi-token-prediction head under `mtp.`."""
    from safetensors.torch import load_file, save_file

    plain = out_dir.parent / "plain"
    model.save_pretrained(plain)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(plain / "model.safetensors").items()}
    tensors["mtp.fc.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(plain / "config.json", out_dir / "config.json")


def write_image_text_hub_checkpoint(model, out_dir) -> None:
    """`model` (a Llama4ForCausalLM) as meta-llama/Llama-4-* ships: an image-text bf16
    checkpoint, the language model under `language_model.`, a vision tower beside it."""
    from safetensors.torch import load_file, save_file

    from tests.models.hub_configs import llama4_image_text_config as hub_config

    plain = out_dir.parent / "plain"
    model.save_pretrained(plain)
    tensors = {
        f"language_model.{k}": v.to(torch.bfloat16)
        for k, v in load_file(plain / "model.safetensors").items()
    }
    tensors["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    out_dir.mkdir()
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((plain / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(hub_config(text)))


@pytest.mark.parametrize("family", ["gpt_oss"], indirect=True)
def test_gpt_oss_layer_on_the_xla_backend_equals_the_reference(family):
    """The quantized GPT-OSS layer's forward (biases, clamp) on the "xla" backend against the
    op's float32 per-row reference."""
    _, _, out = family
    model, _ = load_model(out)
    block = model.layers[1].mlp
    x = jax.random.normal(jax.random.key(0), (64, 128), jnp.float32)
    plan = block.plan(x)
    bias = block.expert_bias.arrays()
    xla = block.experts(x, plan, bias=bias, act=block.act)
    block.experts.set_backend("reference")
    ref = block.experts(x, plan, bias=bias, act=block.act)
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), rtol=1e-4, atol=1e-5)
    assert float(np.abs(np.asarray(ref)).max()) > 0.1
