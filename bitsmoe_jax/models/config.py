"""One model configuration for every supported MoE family.

Hugging Face configs differ by family *and* by transformers version (hub checkpoints say
`rope_theta` / `rope_scaling` / `num_experts`; transformers 5 writes `rope_parameters` and, for
Qwen3-MoE, `num_local_experts`). `ModelConfig.from_hf` folds all of those spellings into one frozen
dataclass so the models never look at raw dicts, and `to_hf` writes a transformers-loadable dict
back (used when we export the reference model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
    "llama4_text",
    "qwen3_next",
)
# model_type spellings of checkpoints whose architecture is one of ours under another name:
# Kimi-K2 ships `"model_type": "kimi_k2"` with `DeepseekV3ForCausalLM` (remote code, same weights).
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3", "llama4": "llama4_text"}
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# Families routing with sigmoid scores + a learned selection bias (DeepSeek-V3's "noaux_tc") and
# making every layer from `first_k_dense_replace` on an MoE layer.
NOAUX_MODEL_TYPES = ("deepseek_v3", "glm4_moe")


# rope_scaling kinds computed as transformers does (`layers.rope_inv_freq`)
ROPE_TYPES = ("linear", "yarn", "llama3")


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a field, has a bad value, or an unknown model_type."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; field names follow Hugging Face where one name exists."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers; Mixtral: expert width)
    moe_intermediate_size: int  # routed expert width F
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable dict items, e.g. YaRN
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    # routing
    norm_topk_prob: bool = True
    router_scoring: str = "softmax"  # softmax | sigmoid (deepseek_v3, glm4_moe)
    topk_method: str = "greedy"  # deepseek_v2: greedy | group_limited_greedy; v3: noaux_tc
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # shared experts
    shared_expert_intermediate_size: int = 0  # qwen2_moe: one gated shared expert of this width
    n_shared_experts: int = 0  # deepseek_v2: shared experts of width n * moe_intermediate_size
    # attention details
    attention_bias: bool = False  # q/k/v biases (qwen2_moe)
    qk_norm: bool = False  # RMSNorm on q and k per head (qwen3_moe, glm4_moe use_qk_norm)
    partial_rotary_factor: float = 1.0  # glm4_moe: RoPE rotates the first half of each head
    rope_interleave: bool = True  # deepseek MLA: RoPE on interleaved pairs (V3's flag; V2 always)
    # which layers are MoE
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # deepseek MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # gpt_oss: router and expert biases, clamped SwiGLU, attention sinks, per-layer windows
    router_bias: bool = False
    expert_bias: bool = False  # gate/up [E, F] and down [E, D] biases of the routed experts
    swiglu_limit: float = 0.0  # > 0: GPT-OSS's activation (up + 1)·g·σ(α·g), clamped at the limit
    swiglu_alpha: float = 1.0
    attention_sinks: bool = False  # a learned per-head logit every query may attend to instead
    layer_types: tuple[str, ...] = ()  # "sliding_attention" | "full_attention" per layer
    # llama4_text: the router's sigmoid score scales the expert's *input* (top-1 routing), MoE
    # layers listed, NoPE layers (no RoPE, attention temperature tuned by position), chunked
    # attention on the RoPE layers (`layer_types` "chunked_attention"), weightless q/k L2 norm
    moe_layer_list: tuple[int, ...] = ()
    no_rope_layers: tuple[int, ...] = ()  # per layer: 1 uses RoPE, 0 is a NoPE layer
    attention_chunk_size: int | None = None
    qk_l2_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    # qwen3_next: Gated DeltaNet linear-attention layers (`layer_types` "linear_attention") beside
    # full attention whose output is gated per channel; RMSNorm weights stored zero-centred
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    attn_output_gate: bool = False
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): 1 for Qwen3-Next
    # multi-token-prediction layers stored after the last decoder layer (DeepSeek-V3, GLM-4.5):
    # not part of the causal LM, skipped by conversion as transformers skips them.
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ------------------------------------------------------------------ derived
    @property
    def is_mla(self) -> bool:
        return self.model_type in MLA_MODEL_TYPES

    @property
    def rope_dim(self) -> int:
        """Dimension RoPE rotates: the decoupled rope part for MLA, the rotary fraction of the head
        otherwise (all of it but for GLM-4.5's partial rotary)."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` holds routed experts (family rules, as in transformers)."""
        if self.model_type == "mixtral":
            return True
        if self.model_type in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
            return (
                layer not in self.mlp_only_layers
                and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0
            )
        if self.model_type == "deepseek_v2":
            return (
                self.num_experts > 0
                and layer >= self.first_k_dense_replace
                and layer % self.moe_layer_freq == 0
            )
        if self.model_type == "gpt_oss":
            return True
        if self.model_type in NOAUX_MODEL_TYPES:
            return self.num_experts > 0 and layer >= self.first_k_dense_replace
        if self.model_type == "llama4_text":
            return layer in self.moe_layer_list
        raise ConfigError(f"unknown model_type {self.model_type!r}")

    @property
    def router_scales_input(self) -> bool:
        """Llama 4: experts see `score · x` and their outputs are summed unweighted."""
        return self.model_type == "llama4_text"

    def is_linear_attention(self, layer: int) -> bool:
        """Qwen3-Next's Gated DeltaNet layers (three of four)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    def uses_rope(self, layer: int) -> bool:
        """False for Llama 4's NoPE layers (no rotary embedding, temperature-tuned queries)."""
        return not self.no_rope_layers or bool(self.no_rope_layers[layer])

    def chunk_of(self, layer: int) -> int | None:
        """Llama 4's chunked attention: a query sees only keys of its own `attention_chunk_size`
        block of absolute positions (None: no chunking)."""
        if self.layer_types and self.layer_types[layer] == "chunked_attention":
            return self.attention_chunk_size
        return None

    def window_of(self, layer: int) -> int | None:
        """Sliding-window size of layer `layer`'s attention (None: full causal attention)."""
        if self.layer_types:
            kind = self.layer_types[layer]
            return self.sliding_window if kind == "sliding_attention" else None
        return self.sliding_window

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict (transformers 4.x hub style or 5.x style)."""
        if hf.get("model_type") == "llama4":
            # the hub's Llama 4 checkpoints are image-text models: the language model's
            # hyper-parameters are in `text_config` (the vision tower is not converted)
            if not isinstance(hf.get("text_config"), dict):
                raise ConfigError(f"{source}: model_type 'llama4' without a text_config object")
            outer = {k: hf[k] for k in ("quantization_config",) if k in hf}
            hf = {**hf["text_config"], **outer, "model_type": "llama4_text"}
        model_type = hf.get("model_type")
        model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES + tuple(MODEL_TYPE_ALIASES))}"
            )

        qc = hf.get("quantization_config")
        shipped = "mxfp4" if model_type == "gpt_oss" else "fp8"  # how the releases are stored
        if isinstance(qc, dict) and qc.get("quant_method", "fp8") not in ("fp8", shipped):
            raise ConfigError(
                f"{source}: the checkpoint is already quantized (quantization_config.quant_method "
                f"{qc.get('quant_method')!r}); BitsMoE reads original weights: bf16/fp16/fp32, the "
                "block-scaled fp8 the DeepSeek-V3 family ships, or GPT-OSS's mxfp4 experts"
            )

        def need(*names: str) -> Any:
            for n in names:
                if hf.get(n) is not None:
                    return hf[n]
            raise ConfigError(
                f"{source}: missing required field {' / '.join(names)!r} for {model_type}"
            )

        def opt(name: str, default: Any) -> Any:
            v = hf.get(name)
            return default if v is None else v

        rope_params = hf.get("rope_parameters") or {}
        rope_theta = float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        scaling = hf.get("rope_scaling")
        if scaling is None and rope_params and rope_params.get("rope_type", "default") != "default":
            scaling = {
                k: v
                for k, v in rope_params.items()
                if k not in ("rope_theta", "partial_rotary_factor")
            }
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            if scaling.get("rope_type", "default") == "default":
                scaling = None
        if scaling and scaling.get("rope_type") not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: rope_scaling rope_type {scaling.get('rope_type')!r} is not supported "
                f"(default, {', '.join(ROPE_TYPES)} are)"
            )
        rope_scaling = tuple(sorted(scaling.items())) if scaling else None

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        common: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(opt("num_key_value_heads", heads)),
            head_dim=int(opt("head_dim", hidden // heads)),
            rms_norm_eps=float(opt("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(opt("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(opt("tie_word_embeddings", False)),
            hidden_act=str(opt("hidden_act", "silu")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            bos_token_id=hf.get("bos_token_id")
            if isinstance(hf.get("bos_token_id"), int)
            else None,
            eos_token_id=hf.get("eos_token_id")
            if isinstance(hf.get("eos_token_id"), int)
            else None,
        )
        if common["hidden_act"] != "silu":
            raise ConfigError(
                f"{source}: hidden_act {common['hidden_act']!r} unsupported (only 'silu')"
            )
        if model_type == "qwen2_moe" and hf.get("use_sliding_window"):
            # transformers windows only some Qwen2-MoE layers (layer_types / max_window_layers);
            # refuse rather than silently window every layer.
            raise ConfigError(f"{source}: use_sliding_window=true is not supported for qwen2_moe")
        if hf.get("sliding_window") and (model_type == "mixtral" or hf.get("use_sliding_window")):
            common["sliding_window"] = int(hf["sliding_window"])

        if model_type == "mixtral":
            f = int(need("intermediate_size"))
            return cls(
                **common,
                intermediate_size=f,
                moe_intermediate_size=f,
                num_experts=int(need("num_local_experts", "num_experts")),
                norm_topk_prob=True,
            )
        if model_type in ("qwen2_moe", "qwen3_moe"):
            extra: dict[str, Any] = {}
            if model_type == "qwen2_moe":
                extra["shared_expert_intermediate_size"] = int(
                    opt("shared_expert_intermediate_size", 0)
                )
                extra["attention_bias"] = bool(opt("qkv_bias", True))
            else:
                extra["attention_bias"] = bool(opt("attention_bias", False))
                extra["qk_norm"] = True
            return cls(
                **common,
                intermediate_size=int(need("intermediate_size")),
                moe_intermediate_size=int(need("moe_intermediate_size")),
                num_experts=int(need("num_experts", "num_local_experts")),
                norm_topk_prob=bool(opt("norm_topk_prob", False)),
                decoder_sparse_step=int(opt("decoder_sparse_step", 1)),
                mlp_only_layers=tuple(int(i) for i in opt("mlp_only_layers", [])),
                **extra,
            )
        if model_type == "gpt_oss":
            return cls._gpt_oss(hf, source, common, need, opt)
        if model_type == "llama4_text":
            return cls._llama4(hf, source, common, need, opt)
        if model_type == "qwen3_next":
            return cls._qwen3_next(hf, source, common, need, opt, rope_params)
        if model_type == "glm4_moe":
            # transformers' Glm4MoeConfig defaults the rotary fraction to 0.5 when absent
            partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor"))
            return cls(
                **common,
                intermediate_size=int(need("intermediate_size")),
                moe_intermediate_size=int(need("moe_intermediate_size")),
                num_experts=int(need("n_routed_experts", "num_local_experts")),
                n_shared_experts=int(opt("n_shared_experts", 0)),
                first_k_dense_replace=int(opt("first_k_dense_replace", 0)),
                **_noaux_routing(hf, source, opt),
                attention_bias=bool(opt("attention_bias", False)),
                qk_norm=bool(opt("use_qk_norm", False)),
                partial_rotary_factor=float(0.5 if partial is None else partial),
                num_nextn_predict_layers=int(opt("num_nextn_predict_layers", 0)),
            )
        # deepseek_v2 / deepseek_v3 (MLA)
        if hf.get("mlp_bias"):
            raise ConfigError(
                f"{source}: mlp_bias=true is unsupported for deepseek_v2 (MLP biases would be "
                "ignored)"
            )
        q_lora = hf.get("q_lora_rank")
        common["head_dim"] = int(need("qk_rope_head_dim"))  # HF's head_dim for V2 is the rope dim
        mla: dict[str, Any] = dict(
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_experts=int(need("n_routed_experts", "num_local_experts")),
            n_shared_experts=int(opt("n_shared_experts", 0)),
            first_k_dense_replace=int(opt("first_k_dense_replace", 0)),
            attention_bias=bool(opt("attention_bias", False)),
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
        )
        if model_type == "deepseek_v3":
            return cls(
                **common,
                **mla,
                **_noaux_routing(hf, source, opt),
                rope_interleave=bool(opt("rope_interleave", True)),
                num_nextn_predict_layers=int(opt("num_nextn_predict_layers", 0)),
            )
        topk_method = str(opt("topk_method", "greedy"))
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{source}: topk_method {topk_method!r} unsupported; use greedy or "
                "group_limited_greedy"
            )
        return cls(
            **common,
            **mla,
            moe_layer_freq=int(opt("moe_layer_freq", 1)),
            norm_topk_prob=False,
            topk_method=topk_method,
            n_group=int(opt("n_group", 1)),
            topk_group=int(opt("topk_group", 1)),
            routed_scaling_factor=float(opt("routed_scaling_factor", 1.0)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers 5.x (and 4.x) loads into the same architecture."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        d: dict[str, Any] = dict(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
            num_experts_per_tok=self.num_experts_per_tok,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "mixtral":
            d.update(
                architectures=["MixtralForCausalLM"],
                intermediate_size=self.moe_intermediate_size,
                num_local_experts=self.num_experts,
                head_dim=self.head_dim,
                sliding_window=self.sliding_window,
            )
        elif self.model_type in ("qwen2_moe", "qwen3_moe"):
            d.update(
                architectures=[
                    "Qwen2MoeForCausalLM"
                    if self.model_type == "qwen2_moe"
                    else "Qwen3MoeForCausalLM"
                ],
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                num_local_experts=self.num_experts,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                head_dim=self.head_dim,
            )
            if self.model_type == "qwen2_moe":
                d.update(
                    shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                    qkv_bias=self.attention_bias,
                )
            else:
                d.update(attention_bias=self.attention_bias)
        elif self.model_type == "gpt_oss":
            d.update(
                architectures=["GptOssForCausalLM"],
                head_dim=self.head_dim,
                intermediate_size=self.moe_intermediate_size,
                num_local_experts=self.num_experts,
                attention_bias=self.attention_bias,
                swiglu_limit=self.swiglu_limit,
                swiglu_alpha=self.swiglu_alpha,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types),
            )
        elif self.model_type == "qwen3_next":
            d.update(
                architectures=["Qwen3NextForCausalLM"],
                head_dim=self.head_dim,
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                partial_rotary_factor=self.partial_rotary_factor,
                layer_types=list(self.layer_types),
                linear_conv_kernel_dim=self.linear_conv_kernel_dim,
                linear_key_head_dim=self.linear_key_head_dim,
                linear_value_head_dim=self.linear_value_head_dim,
                linear_num_key_heads=self.linear_num_key_heads,
                linear_num_value_heads=self.linear_num_value_heads,
            )
            d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        elif self.model_type == "llama4_text":
            d.update(
                architectures=["Llama4ForCausalLM"],
                head_dim=self.head_dim,
                intermediate_size=self.moe_intermediate_size,
                intermediate_size_mlp=self.intermediate_size,
                num_local_experts=self.num_experts,
                moe_layers=list(self.moe_layer_list),
                no_rope_layers=list(self.no_rope_layers),
                layer_types=list(self.layer_types),
                attention_chunk_size=self.attention_chunk_size,
                use_qk_norm=self.qk_l2_norm,
                attn_temperature_tuning=self.attn_temperature_tuning,
                floor_scale=self.floor_scale,
                attn_scale=self.attn_scale,
            )
        elif self.model_type == "glm4_moe":
            d.update(
                architectures=["Glm4MoeForCausalLM"],
                head_dim=self.head_dim,
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                n_routed_experts=self.num_experts,
                n_shared_experts=self.n_shared_experts,
                first_k_dense_replace=self.first_k_dense_replace,
                **self._noaux_hf(),
                attention_bias=self.attention_bias,
                use_qk_norm=self.qk_norm,
                partial_rotary_factor=self.partial_rotary_factor,
                num_nextn_predict_layers=self.num_nextn_predict_layers,
            )
            d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        elif self.model_type == "deepseek_v3":
            d.update(
                architectures=["DeepseekV3ForCausalLM"],
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                n_routed_experts=self.num_experts,
                n_shared_experts=self.n_shared_experts,
                first_k_dense_replace=self.first_k_dense_replace,
                **self._noaux_hf(),
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                attention_bias=self.attention_bias,
                rope_interleave=self.rope_interleave,
                num_nextn_predict_layers=self.num_nextn_predict_layers,
            )
        else:
            d.update(
                architectures=["DeepseekV2ForCausalLM"],
                intermediate_size=self.intermediate_size,
                moe_intermediate_size=self.moe_intermediate_size,
                n_routed_experts=self.num_experts,
                n_shared_experts=self.n_shared_experts,
                first_k_dense_replace=self.first_k_dense_replace,
                moe_layer_freq=self.moe_layer_freq,
                topk_method=self.topk_method,
                n_group=self.n_group,
                topk_group=self.topk_group,
                routed_scaling_factor=self.routed_scaling_factor,
                q_lora_rank=self.q_lora_rank,
                kv_lora_rank=self.kv_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.qk_rope_head_dim,
                v_head_dim=self.v_head_dim,
                attention_bias=self.attention_bias,
            )
        return d

    @classmethod
    def _gpt_oss(
        cls, hf: dict[str, Any], source: str, common: dict[str, Any], need: Any, opt: Any
    ) -> ModelConfig:
        """GPT-OSS: every layer MoE, experts of width intermediate_size with biases and the
        clamped SwiGLU, a biased router whose top-k logits are softmaxed (= softmax then
        renormalised top-k), q/k/v/o biases, attention sinks, sliding and full layers."""
        n = int(common["num_hidden_layers"])
        layer_types = tuple(
            opt(
                "layer_types",
                ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
            )
        )
        if len(layer_types) != n or set(layer_types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(
                f"{source}: layer_types must give sliding_attention or full_attention for each of "
                f"the {n} layers, got {list(layer_types)}"
            )
        if (
            common["rope_scaling"] is None
            and not hf.get("rope_scaling")
            and not (hf.get("rope_parameters") or {}).get("rope_type")
        ):
            # transformers' GptOssConfig default when the config names no rope scaling
            common["rope_scaling"] = tuple(
                sorted(
                    {
                        "rope_type": "yarn",
                        "factor": 32.0,
                        "beta_fast": 32.0,
                        "beta_slow": 1.0,
                        "truncate": False,
                        "original_max_position_embeddings": 4096,
                    }.items()
                )
            )
        f = int(need("intermediate_size"))
        return cls(
            **{**common, "sliding_window": int(opt("sliding_window", 128))},
            intermediate_size=f,
            moe_intermediate_size=f,
            num_experts=int(need("num_local_experts", "num_experts")),
            norm_topk_prob=True,
            attention_bias=bool(opt("attention_bias", True)),
            router_bias=True,
            expert_bias=True,
            swiglu_limit=float(opt("swiglu_limit", 7.0)),
            swiglu_alpha=float(opt("swiglu_alpha", 1.702)),
            attention_sinks=True,
            layer_types=layer_types,
        )

    @classmethod
    def _llama4(
        cls, hf: dict[str, Any], source: str, common: dict[str, Any], need: Any, opt: Any
    ) -> ModelConfig:
        """Llama 4 (text): HF's `intermediate_size` is the expert (and shared expert) width,
        `intermediate_size_mlp` the dense layers'; layer lists defaulted as Llama4TextConfig
        does."""
        n = int(common["num_hidden_layers"])
        if common["num_experts_per_tok"] != 1:
            raise ConfigError(
                f"{source}: num_experts_per_tok {common['num_experts_per_tok']} for llama4_text: "
                "only top-1 routing (every released Llama 4) is supported — the router's score "
                "scales the expert's input, which the calibration models for one expert per token"
            )
        step = int(opt("interleave_moe_layer_step", 1))
        moe = opt("moe_layers", None)
        moe = tuple(int(i) for i in (range(step - 1, n, step) if moe is None else moe))
        interval = int(opt("no_rope_layer_interval", 4))
        no_rope = tuple(
            int(v)
            for v in (
                opt("no_rope_layers", None) or [int((i + 1) % interval != 0) for i in range(n)]
            )
        )
        chunk = hf.get("attention_chunk_size", 8192)
        layer_types = tuple(
            opt(
                "layer_types",
                [
                    "chunked_attention" if r and chunk is not None else "full_attention"
                    for r in no_rope
                ],
            )
        )
        for name, seq in (("no_rope_layers", no_rope), ("layer_types", layer_types)):
            if len(seq) < n:
                raise ConfigError(f"{source}: {name} has {len(seq)} entries for {n} layers")
        if set(layer_types[:n]) - {"chunked_attention", "full_attention"}:
            raise ConfigError(
                f"{source}: layer_types must give chunked_attention or full_attention per layer, "
                f"got {sorted(set(layer_types))}"
            )
        if any(not 0 <= i < n for i in moe):
            raise ConfigError(f"{source}: moe_layers {list(moe)} outside 0..{n - 1}")
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for llama4_text")
        return cls(
            **common,
            intermediate_size=int(opt("intermediate_size_mlp", 16384)),
            moe_intermediate_size=int(need("intermediate_size")),
            num_experts=int(need("num_local_experts")),
            moe_layer_list=moe,
            no_rope_layers=no_rope[:n],
            layer_types=layer_types[:n],
            attention_chunk_size=None if chunk is None else int(chunk),
            qk_l2_norm=bool(opt("use_qk_norm", True)),
            attn_temperature_tuning=bool(opt("attn_temperature_tuning", True)),
            floor_scale=float(opt("floor_scale", 8192)),
            attn_scale=float(opt("attn_scale", 0.1)),
        )

    @classmethod
    def _qwen3_next(
        cls,
        hf: dict[str, Any],
        source: str,
        common: dict[str, Any],
        need: Any,
        opt: Any,
        rope_params: dict[str, Any],
    ) -> ModelConfig:
        """Qwen3-Next: Qwen's MoE (softmax top-k, a sigmoid-gated shared expert) under a hybrid
        of Gated DeltaNet layers and gated full attention (every `full_attention_interval`-th),
        partial rotary (a quarter of each head by default), zero-centred RMSNorm weights."""
        n = int(common["num_hidden_layers"])
        interval = int(opt("full_attention_interval", 4))
        layer_types = tuple(
            opt(
                "layer_types",
                ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)],
            )
        )
        if len(layer_types) != n or set(layer_types) - {"linear_attention", "full_attention"}:
            raise ConfigError(
                f"{source}: layer_types must give linear_attention or full_attention for each of "
                f"the {n} layers, got {list(layer_types)}"
            )
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for qwen3_next")
        partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor"))
        heads = {
            name: int(need(name))
            for name in (
                "linear_key_head_dim",
                "linear_value_head_dim",
                "linear_num_key_heads",
                "linear_num_value_heads",
            )
        }
        if heads["linear_num_value_heads"] % heads["linear_num_key_heads"]:
            raise ConfigError(
                f"{source}: linear_num_value_heads {heads['linear_num_value_heads']} is not a "
                f"multiple of linear_num_key_heads {heads['linear_num_key_heads']}"
            )
        return cls(
            **common,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_experts=int(need("num_experts", "num_local_experts")),
            norm_topk_prob=bool(opt("norm_topk_prob", True)),
            decoder_sparse_step=int(opt("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in opt("mlp_only_layers", [])),
            shared_expert_intermediate_size=int(opt("shared_expert_intermediate_size", 0)),
            qk_norm=True,
            partial_rotary_factor=float(0.25 if partial is None else partial),
            layer_types=layer_types,
            linear_conv_kernel_dim=int(opt("linear_conv_kernel_dim", 4)),
            **heads,
            attn_output_gate=True,
            norm_offset=1.0,
        )

    def _noaux_hf(self) -> dict[str, Any]:
        """The routing fields of DeepSeek-V3 / GLM-4.5 configs, as the hub spells them."""
        return dict(
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )

    # ------------------------------------------------------------------ own JSON
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
        if raw.get("rope_scaling"):
            raw["rope_scaling"] = tuple(tuple(kv) for kv in raw["rope_scaling"])
        raw["mlp_only_layers"] = tuple(raw.get("mlp_only_layers", ()))
        for name in ("layer_types", "moe_layer_list", "no_rope_layers"):
            raw[name] = tuple(raw.get(name, ()))
        return cls(**raw)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: no config.json in the checkpoint directory")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from e
        return cls.from_hf(raw, source=str(p))

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _noaux_routing(hf: dict[str, Any], source: str, opt: Any) -> dict[str, Any]:
    """Routing fields of the sigmoid + correction-bias router (DeepSeek-V3, Kimi-K2, GLM-4.5).

    transformers implements only this router for these families and ignores `topk_method` /
    `scoring_func`; a config naming another one describes a model it (and we) would run wrongly.
    """
    method = opt("topk_method", "noaux_tc")
    scoring = opt("scoring_func", "sigmoid")
    if method != "noaux_tc" or scoring != "sigmoid":
        raise ConfigError(
            f"{source}: topk_method {method!r} with scoring_func {scoring!r} is unsupported for "
            f"{hf.get('model_type')}; only noaux_tc with sigmoid (the released checkpoints') is"
        )
    n_experts = int(hf.get("n_routed_experts") or hf.get("num_local_experts") or 0)
    n_group, topk_group = int(opt("n_group", 1)), int(opt("topk_group", 1))
    if n_group < 1 or n_experts % n_group or not 1 <= topk_group <= n_group:
        raise ConfigError(
            f"{source}: n_group={n_group} must divide n_routed_experts={n_experts} and "
            f"1 <= topk_group={topk_group} <= n_group"
        )
    return dict(
        router_scoring="sigmoid",
        topk_method="noaux_tc",
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(opt("norm_topk_prob", True)),
        routed_scaling_factor=float(opt("routed_scaling_factor", 1.0)),
    )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude correction (0.1·m·ln s + 1), 1 when not extrapolating."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
