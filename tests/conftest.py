"""Shared test helpers: tiny random-weight Hugging Face MoE models as independent references.

Every parity test compares our Flax model against transformers (PyTorch, CPU, fp32, eager
attention). Models are built by `make_hf_model`, re-initialised with N(0, std) weights (norm weights
1 + N(0, std)) so that routing is far from uniform, and saved with `save_pretrained`. Building and
saving is cached per session (`tiny_family`): several test files read the same directory, never
modify it in place.

Sizes are chosen so that no two dimensions coincide (hidden 64, expert width 48 or 32, dense width
96, shared-expert width 80, head_dim 16 or 24, vocab 256): a transposed or swapped tensor is a shape
error, not a silent mistake.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# torch / transformers are an optional extra: only the tests that use these helpers need them (they
# `pytest.importorskip` them), the rest of the suite must collect without them.
try:
    import torch
    import transformers
except ImportError:  # pragma: no cover - depends on the environment
    torch = transformers = None
else:
    # Keep CPU use predictable (the issue budget is 2 cores).
    torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 256
PARITY_TOL = 1e-4

# family name -> (model class name, config class name, config overrides)
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    # no EOS: HF generate(min_new_tokens=...) would suppress it and our greedy loop does not.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Mixtral: every layer MoE, top-2 renormalised, expert width 48.
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    # Mixtral with a sliding window shorter than the test sequences.
    "mixtral_sw": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=16,
        ),
    ),
    # Qwen2-MoE: dense first layer (mlp_only_layers=[0]), shared expert + gate, qkv biases, top-4
    # unnormalised.
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=80,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            qkv_bias=True,
            mlp_only_layers=[0],
            decoder_sparse_step=1,
            use_sliding_window=False,
        ),
    ),
    # Qwen2-MoE: top-2 normalised, decoder_sparse_step=2 (layers 1 and 3 MoE, 0 and 2 dense).
    "qwen2_moe_norm": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=80,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            qkv_bias=True,
            mlp_only_layers=[],
            decoder_sparse_step=2,
            use_sliding_window=False,
        ),
    ),
    # Qwen3-MoE: q/k norm, explicit head_dim (24 != 64/4), decoder_sparse_step=2 (layers 1, 3 MoE;
    # 0, 2 dense), top-2 normalised.
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=4,
            head_dim=24,
            intermediate_size=112,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
        ),
    ),
    # Qwen3-MoE: top-4 unnormalised, mlp_only_layers=[1] (dense middle layer), attention_bias=True
    # (q/k/v *and* o_proj biases in Qwen3-MoE).
    "qwen3_moe_nonorm": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(
            _COMMON,
            num_hidden_layers=3,
            head_dim=24,
            intermediate_size=112,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            attention_bias=True,
            use_sliding_window=False,
        ),
    ),
}


def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Overwrite every parameter: N(0, std), norm weights 1 + N(0, std). Deterministic per seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if "norm" in name and p.ndim == 1:
                noise = noise + 1.0
            p.copy_(noise.to(p.dtype))


def make_hf_model(
    model_cls: type | str,
    config_cls: type | str,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    std: float = 0.08,
    save_kwargs: dict[str, Any] | None = None,
    **cfg_overrides: Any,
) -> tuple[Path | None, torch.nn.Module]:
    """Build a random-weight HF model (fp32, eval, eager attention); save it when `out_dir` is
    given.

    `model_cls` / `config_cls` are classes or names in `transformers`. Returns (out_dir, model).
    """
    if transformers is None:
        pytest.skip("needs torch + transformers")
    if isinstance(model_cls, str):
        model_cls = getattr(transformers, model_cls)
    if isinstance(config_cls, str):
        config_cls = getattr(transformers, config_cls)
    torch.manual_seed(seed)
    config = config_cls(**cfg_overrides)
    config._attn_implementation = "eager"
    model = model_cls(config).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    reinit_(model, seed=seed, std=std)
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, **(save_kwargs or {}))
    return out_dir, model


def family_spec(family: str) -> tuple[str, str, dict[str, Any]]:
    m, c, kw = FAMILIES[family]
    return m, c, copy.deepcopy(kw)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Callable[[str], tuple[Path, torch.nn.Module]]:
    """`tiny_family(name)` -> (saved HF dir, HF model); built once per session per family. Do not
    modify."""
    cache: dict[str, tuple[Path, Any]] = {}

    def get(family: str) -> tuple[Path, Any]:
        if family not in cache:
            m, c, kw = family_spec(family)
            cache[family] = make_hf_model(m, c, tmp_path_factory.mktemp(f"hf_{family}"), **kw)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def flax_from_hf() -> Callable[[str | Path], tuple[Any, Any]]:
    """`flax_from_hf(hf_dir)` -> (model, config) via `load_model`, cached per directory for the
    session."""
    from bitsmoe_jax.loading import load_model

    cache: dict[str, tuple[Any, Any]] = {}

    def get(path: str | Path) -> tuple[Any, Any]:
        key = str(Path(path).absolute())
        if key not in cache:
            cache[key] = load_model(path)
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------ helpers
def random_ids(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """Full-sequence fp32 logits from transformers."""
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def hf_greedy(model: torch.nn.Module, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """HF greedy generation (with its KV cache); returns only the new tokens [B, new_tokens]."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids_t,
            attention_mask=torch.ones_like(ids_t),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            use_cache=True,
        )
    return out[:, ids_t.shape[1] :].numpy()


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flax_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


# The test files that take longest (about a minute or more on the 2 CI cores), longest first.
# `pytest -n 2 --dist loadfile` hands whole files to the two workers in collection order, so a long
# file collected last (the top-level tests/test_*.py are) runs alone at the end while the other
# worker idles; starting with the longest files (longest-processing-time-first) keeps both busy to
# the end. Only the order changes: every test still runs, each file on one worker.
LONGEST_FIRST = (
    "tests/distributed/test_multihost.py",
    "tests/run/test_quality_bar.py",
    "tests/run/test_new_families_quantize.py",
    "tests/kernels/test_backends.py",
    "tests/run/test_pipeline.py",
    "tests/test_tune.py",
    "tests/test_lm_eval.py",
    "tests/run/test_resume.py",
    "tests/kernels/test_model_paths.py",
    "tests/kernels/test_ref_bounds.py",
    "tests/models/test_noaux_families.py",
    "tests/method/test_expert_scale_tuning.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parents[1]

    def rank(item: pytest.Item) -> int:
        path = Path(str(item.fspath)).resolve()
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: files keep their tests' order, the rest their collection order
