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

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")


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
    router_scoring: str = "softmax"
    topk_method: str = "greedy"  # deepseek: greedy | group_limited_greedy
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # shared experts
    shared_expert_intermediate_size: int = 0  # qwen2_moe: one gated shared expert of this width
    n_shared_experts: int = 0  # deepseek_v2: shared experts of width n * moe_intermediate_size
    # attention details
    attention_bias: bool = False  # q/k/v biases (qwen2_moe)
    qk_norm: bool = False  # RMSNorm on q and k per head (qwen3_moe)
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
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ------------------------------------------------------------------ derived
    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v2"

    @property
    def rope_dim(self) -> int:
        """Dimension RoPE rotates: the decoupled rope part for MLA, the full head otherwise."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` holds routed experts (family rules, as in transformers)."""
        if self.model_type == "mixtral":
            return True
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
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
        raise ConfigError(f"unknown model_type {self.model_type!r}")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict (transformers 4.x hub style or 5.x style)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
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
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling is not None:
            scaling = dict(scaling)
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            if scaling.get("rope_type", "default") == "default":
                scaling = None
        if scaling and scaling.get("rope_type") not in ("linear", "yarn"):
            raise ConfigError(
                f"{source}: rope_scaling rope_type {scaling.get('rope_type')!r} is not supported "
                "(default, linear and yarn are)"
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
        # deepseek_v2
        if hf.get("mlp_bias"):
            raise ConfigError(
                f"{source}: mlp_bias=true is unsupported for deepseek_v2 (MLP biases would be "
                "ignored)"
            )
        q_lora = hf.get("q_lora_rank")
        common["head_dim"] = int(need("qk_rope_head_dim"))  # HF's head_dim for V2 is the rope dim
        topk_method = str(opt("topk_method", "greedy"))
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"{source}: topk_method {topk_method!r} unsupported; use greedy or "
                "group_limited_greedy"
            )
        return cls(
            **common,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_experts=int(need("n_routed_experts")),
            n_shared_experts=int(opt("n_shared_experts", 0)),
            first_k_dense_replace=int(opt("first_k_dense_replace", 0)),
            moe_layer_freq=int(opt("moe_layer_freq", 1)),
            norm_topk_prob=False,
            topk_method=topk_method,
            n_group=int(opt("n_group", 1)),
            topk_group=int(opt("topk_group", 1)),
            routed_scaling_factor=float(opt("routed_scaling_factor", 1.0)),
            attention_bias=bool(opt("attention_bias", False)),
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(need("v_head_dim")),
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


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-magnitude correction (0.1·m·ln s + 1), 1 when not extrapolating."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
