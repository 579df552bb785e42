"""Random-weight Mixtral checkpoints in the Hugging Face layout (bf16, sharded safetensors).

For memory and resume tests and benchmarks that need a model of a chosen size without downloading
one: `write_random_mixtral` writes `config.json`, `model-XXXXX-of-YYYYY.safetensors` shards of at
most `shard_bytes` each with `model.safetensors.index.json`, and the shipped reference model's
tokenizer files (the vocabulary is that tokenizer's). Tensors are generated and written one layer at
a time, so a checkpoint far larger than RAM can be made. Weights are N(0, std), norms 1 + N(0, std);
the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from bitsmoe_jax.io.data import REFERENCE_DIR
from conversion.convert import TOKENIZER_FILES
from conversion.hf_checkpoint import write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def _reference_dir() -> Path:

    return Path(REFERENCE_DIR)


def mixtral_config(
    layers: int,
    hidden: int,
    inter: int,
    experts: int,
    heads: int = 4,
    kv_heads: int = 2,
    top_k: int = 2,
    vocab: int | None = None,
) -> dict:
    """A config.json dict for transformers' Mixtral with the given sizes."""
    if vocab is None:
        vocab = json.loads((_reference_dir() / "config.json").read_text())["vocab_size"]
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def _layer_tensors(
    cfg: dict, i: int, rng: np.random.Generator, std: float
) -> Iterator[tuple[str, np.ndarray]]:
    """Layer i's tensors one at a time (a Mixtral-8x7B layer is 2.75 GiB in bf16)."""
    d, f, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * std).astype(BF16)

    p = f"model.layers.{i}."
    yield p + "self_attn.q_proj.weight", w(q, d)
    yield p + "self_attn.k_proj.weight", w(kv, d)
    yield p + "self_attn.v_proj.weight", w(kv, d)
    yield p + "self_attn.o_proj.weight", w(d, q)
    yield p + "input_layernorm.weight", (1 + w(d).astype(np.float32)).astype(BF16)
    yield p + "post_attention_layernorm.weight", (1 + w(d).astype(np.float32)).astype(BF16)
    yield (
        p + "block_sparse_moe.gate.weight",
        (rng.standard_normal((e, d), np.float32) / np.sqrt(d)).astype(BF16),
    )
    for j in range(e):
        yield p + f"block_sparse_moe.experts.{j}.w1.weight", w(f, d)
        yield p + f"block_sparse_moe.experts.{j}.w3.weight", w(f, d)
        yield p + f"block_sparse_moe.experts.{j}.w2.weight", w(d, f)


def write_random_mixtral(
    out_dir: str | Path,
    layers: int,
    hidden: int,
    inter: int,
    experts: int,
    *,
    shard_bytes: int = 1 << 30,
    seed: int = 0,
    std: float = 0.02,
    **config_kw,
) -> Path:
    """Write a random Mixtral checkpoint to `out_dir` (created; must not exist). Returns its
    path."""
    out = Path(out_dir)
    out.mkdir(parents=True)
    cfg = mixtral_config(layers, hidden, inter, experts, **config_kw)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in TOKENIZER_FILES:
        if (_reference_dir() / name).is_file():
            shutil.copy(_reference_dir() / name, out / name)
    rng = np.random.default_rng(seed)
    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    total = 0

    def flush() -> None:
        if pending:
            shards.append(sorted(pending))
            write_safetensors(
                out / f"shard-{len(shards):05d}.safetensors", pending, metadata={"format": "pt"}
            )
            pending.clear()

    def add(tensors: Iterable[tuple[str, np.ndarray]]) -> None:
        nonlocal total
        for k, v in tensors:
            if pending and sum(a.nbytes for a in pending.values()) + v.nbytes > shard_bytes:
                flush()
            pending[k] = v
            total += v.nbytes

    v, d = cfg["vocab_size"], hidden
    add([("model.embed_tokens.weight", (rng.standard_normal((v, d), np.float32)).astype(BF16))])
    for i in range(layers):
        add(_layer_tensors(cfg, i, rng, std))
    add(
        [
            ("model.norm.weight", np.ones(d, BF16)),
            ("lm_head.weight", (rng.standard_normal((v, d), np.float32) * std).astype(BF16)),
        ]
    )
    flush()
    n = len(shards)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (out / f"shard-{k:05d}.safetensors").rename(out / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return out


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
