"""Hugging Face checkpoint -> Flax parameters, one part (top-level weights, then each layer) at a
time.

The expected parameter tree comes from the abstract model (`nnx.eval_shape`, no memory), so every
tensor is checked against the shape the config implies before it is used, and a missing tensor,
wrong shape or NaN is reported by name. Only one layer's tensors are alive at any time.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from bitsmoe_jax.io.checkpoint import FORMAT_CONVERTED, META_FILE, atomic_directory, save_tree
from bitsmoe_jax.models.assemble import leaf_dtype
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.models.transformer import build_model
from conversion.hf_checkpoint import CheckpointError, HFCheckpoint
from conversion.key_maps import TOP_LEVEL, pairs_to_halves, read_expert_subset, read_param

# Llama 4's q/k projections, whose RoPE pairs are reordered on reading (`pairs_to_halves`)
ROTARY_KERNELS = (("self_attn", "q_proj", "kernel"), ("self_attn", "k_proj", "kernel"))

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def np_dtype(name: str) -> np.dtype:
    if name not in NP_DTYPES:
        raise ValueError(f"dtype {name!r} not supported; choose one of {sorted(NP_DTYPES)}")
    return NP_DTYPES[name]


def expected_tree(config: ModelConfig) -> dict[str, Any]:
    """Our parameter tree as {path: ShapeDtypeStruct}, without allocating anything."""
    abstract = build_model(config, abstract=True)
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def expected_parts(config: ModelConfig) -> tuple[dict[str, Any], Any]:
    """(the top-level params' expected tree — no `lm_head` when tied to the embeddings —, the
    per-layer expected trees): what each streamed part must hold."""
    expected = expected_tree(config)
    layers = expected.pop("layers")
    if config.tie_word_embeddings:
        expected.pop("lm_head", None)
    return expected, layers


def iter_leaves(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) for every leaf of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from iter_leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class _RecordingGetter:
    """Remembers which HF tensors a parameter came from, so shape errors can name them and their
    file."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self.used: list[str] = []

    def __call__(self, name: str) -> np.ndarray:
        self.used.append(name)
        return self.ckpt.get(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        self.used.append(name)
        return self.ckpt.get_rows(name, start, stop)

    def where(self) -> str:
        if not self.used:
            return "checkpoint"
        k = self.used[-1]
        return f"tensor {k!r} in {self.ckpt.file_of(k).name}"


def _read_part(
    ckpt: HFCheckpoint,
    config: ModelConfig,
    expected: dict,
    layer: int | None,
    dtype: np.dtype,
    used: set[str],
    experts: Sequence[int] | None = None,
) -> dict:
    keys = dict.fromkeys(ckpt.keys())
    out: dict = {}
    for path, spec in iter_leaves(expected):
        getter = _RecordingGetter(ckpt)
        if layer is not None and experts is not None and path[:2] == ("mlp", "experts"):
            prefix = f"model.layers.{layer}."
            if not experts:  # the caller reads the experts itself, a few at a time
                used.update(k for k in keys if k.startswith(prefix) and ".experts." in k)
                continue
            _set(
                out,
                path,
                read_expert_subset(
                    prefix, path[2], keys, getter, getter.rows, spec.shape, dtype, experts
                ),
            )
            # the other experts' tensors are other processes' to read (and to check)
            used.update(k for k in keys if k.startswith(prefix) and ".experts." in k)
            continue
        if layer is None:
            hf_key, transpose = TOP_LEVEL[path]
            value = getter(hf_key) if hf_key in keys else None
            if value is None:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {hf_key!r} is missing from the checkpoint"
                )
            value = value.T if transpose else value
        else:
            value = read_param(path, f"model.layers.{layer}.", keys, getter, config.num_experts)
            if config.model_type == "llama4_text" and path in ROTARY_KERNELS:
                value = pairs_to_halves(value, config.head_dim)
        if tuple(value.shape) != tuple(spec.shape):
            raise CheckpointError(
                f"{getter.where()}: shape {tuple(value.shape)} does not match {tuple(spec.shape)} "
                f"expected from config.json for {'.'.join(map(str, path))}"
                + ("" if layer is None else f" of layer {layer}")
            )
        _set(out, path, np.ascontiguousarray(value.astype(leaf_dtype(path, dtype))))
        used.update(getter.used)
    return out


# Non-persistent buffers some older exports still contain; they carry no weights.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def mtp_prefixes(config: ModelConfig) -> tuple[str, ...]:
    """Key prefixes of the multi-token-prediction layers stored after the last decoder layer
    (`model.layers.61.*` in DeepSeek-V3): training-time heads that transformers skips on load and
    the causal LM never runs, so conversion skips them too. Qwen3-Next stores its head under
    `mtp.` (transformers ignores those keys on load)."""
    n = config.num_hidden_layers
    extra = ("mtp.",) if config.model_type == "qwen3_next" else ()
    return extra + tuple(f"model.layers.{n + i}." for i in range(config.num_nextn_predict_layers))


def check_all_used(ckpt: HFCheckpoint, used: set[str], config: ModelConfig) -> None:
    """Refuse tensors the model does not use: they mean an architecture feature we would silently
    drop (multi-token-prediction layers excepted, `mtp_prefixes`)."""
    skip = mtp_prefixes(config)
    unused = sorted(
        k
        for k in ckpt.keys()
        if k not in used
        and not k.endswith(IGNORABLE_SUFFIXES)
        and not (skip and k.startswith(skip))
    )
    if unused:
        more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
        raise CheckpointError(
            f"{ckpt.path}: {len(unused)} tensors are not used by the model: "
            f"{', '.join(repr(k) for k in unused[:5])}{more} — the config.json may not describe "
            "this checkpoint "
            "(e.g. a bias or layer this architecture setting does not have)"
        )


def iter_parts(
    hf_dir: str | Path,
    dtype: str = "float32",
    config: ModelConfig | None = None,
    experts: Sequence[int] | None = None,
) -> Iterator[tuple[str | int, dict]]:
    """Yield ("top", params) then (i, layer_params) for each layer, streamed from an HF directory.

    `experts`: read only these routed experts' weights (per-expert tensors, or rows of fused ones);
    the others' entries are zeros. Empty: the layers carry no `mlp.experts` at all (the
    quantizer streams them itself, `run.expert_reader.CheckpointSource`).
    """
    config = config or ModelConfig.from_hf_dir(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    expected, layers = expected_parts(config)
    dt = np_dtype(dtype)
    used: set[str] = set()
    yield "top", _read_part(ckpt, config, expected, None, dt, used)
    for i in range(config.num_hidden_layers):
        yield i, _read_part(ckpt, config, layers[i], i, dt, used, experts)
        ckpt.release()
    check_all_used(ckpt, used, config)


def convert_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a converted checkpoint (orbax params per part + metadata) atomically; return its
    path."""
    from tqdm.auto import tqdm

    hf_dir = Path(hf_dir)
    config = ModelConfig.from_hf_dir(hf_dir)
    t0 = time.time()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        bar = tqdm(
            total=config.num_hidden_layers + 1, desc="convert", unit="part", disable=not progress
        )
        for name, part in iter_parts(hf_dir, dtype, config):
            save_tree(tmp / "params" / ("top" if name == "top" else f"layer_{name:03d}"), part)
            bar.update(1)
        bar.close()
        shutil.copy(hf_dir / "config.json", tmp / "config.json")
        for f in TOKENIZER_FILES:
            if (hf_dir / f).is_file():
                shutil.copy(hf_dir / f, tmp / f)
        meta = {
            "format": FORMAT_CONVERTED,
            "version": 1,
            "dtype": dtype,
            "config": json.loads(config.to_json()),
            "source": str(hf_dir.absolute()),
            "convert_time_s": round(time.time() - t0, 3),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out_dir)


def abstract_shapes(config: ModelConfig) -> dict:
    """Param shapes per path (for tests and the real-size parameter count)."""
    return jax.tree.map(lambda s: tuple(s.shape), expected_tree(config))
