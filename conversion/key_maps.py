"""Where each Flax parameter lives in a Hugging Face checkpoint, for every family and layout.

Our modules are named after transformers' (`self_attn.q_proj`, `input_layernorm`, ...), so most keys
map by rule: a 2-D `X.weight` is our `X.kernel` transposed, 1-D weights and biases keep their names.
The exceptions are the MoE pieces, handled explicitly:

- MoE prefix: `mlp.` (Qwen, DeepSeek, transformers-5 Mixtral in memory) or `block_sparse_moe.`
  (Mixtral files).
- router: HF `{moe}.gate.weight` [E, D] -> our `mlp.router.kernel` [D, E]; sigmoid routers'
  `mlp.gate.e_score_correction_bias` [E] -> `mlp.router.e_score_correction_bias` (kept float32).
- routed experts, per-expert files: `{moe}.experts.{e}.{w1|gate_proj}` (gate), `{w3|up_proj}` (up),
  `{w2|down_proj}` (down); fused files: `{moe}.experts.gate_up_proj` [E, 2F, D] (gate rows first)
  and
  `{moe}.experts.down_proj` [E, D, F]. Ours: gate/up [E, D, F], down [E, F, D].
- shared experts: Qwen2 `mlp.shared_expert.*`, DeepSeek `mlp.shared_experts.*` -> our
  `mlp.shared_expert.*`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from conversion.hf_checkpoint import CheckpointError

Path = tuple[str, ...]
Getter = Callable[[str], np.ndarray]
RowGetter = Callable[[str, int, int], np.ndarray]  # rows [start, stop) of a tensor's first axis
# `feed_forward.` is Llama 4's, whose experts are always fused and transposed (`LLAMA4_MOE`).
MOE_PREFIXES = ("mlp", "block_sparse_moe", "feed_forward")
# Llama 4: `feed_forward.experts.gate_up_proj` [E, D, 2F] (gate the first F columns) and
# `feed_forward.experts.down_proj` [E, F, D] (ours already); router `feed_forward.router`, shared
# expert `feed_forward.shared_expert.*`, dense layers `feed_forward.{gate,up,down}_proj`.
LLAMA4_MOE = "feed_forward"
PER_EXPERT_NAMES = {
    "gate": ("w1", "gate_proj"),
    "up": ("w3", "up_proj"),
    "down": ("w2", "down_proj"),
}


def _hf_generic(path: Path) -> tuple[str, bool]:
    """Our path -> (HF key suffix, transpose?) for parameters that map by rule."""
    if path[-1] == "kernel":
        return ".".join(path[:-1]) + ".weight", True
    return ".".join(path), False


def _shared_names(path: Path) -> list[str]:
    rest = ".".join(path[2:])
    return [f"mlp.shared_expert.{rest}", f"mlp.shared_experts.{rest}"]


# GPT-OSS keeps its experts fused and transposed: `experts.gate_up_proj` [E, D, 2F] with gate and
# up in *interleaved* columns (gate 0::2, up 1::2), `experts.down_proj` [E, F, D], and biases
# `experts.gate_up_proj_bias` [E, 2F] (interleaved alike) and `experts.down_proj_bias` [E, D].
# Its files are recognised by that bias; the MXFP4 release stores the weights as `X_blocks` +
# `X_scales`, decoded by the reader into the same [E, D, 2F] / [E, F, D] tensors.
GPT_OSS_BIAS = {
    "gate": ("gate_up_proj_bias", slice(0, None, 2)),
    "up": ("gate_up_proj_bias", slice(1, None, 2)),
    "down": ("down_proj_bias", slice(None)),
}


def expert_bias_key(layer_prefix: str, which: str) -> tuple[str, slice]:
    """(HF key, column slice) of GPT-OSS's expert bias `which` (gate | up | down)."""
    name, cols = GPT_OSS_BIAS[which]
    return f"{layer_prefix}mlp.experts.{name}", cols


def _is_gpt_oss(base: str, keys: Mapping[str, object]) -> bool:
    return f"{base}.gate_up_proj_bias" in keys


def _transposed_gate_up_columns(
    moe: str, base: str, keys: Mapping[str, object]
) -> Callable[[int], dict[str, slice]] | None:
    """For the layouts that fuse experts transposed — `gate_up_proj` [E, D, 2F], `down_proj`
    [E, F, D] (ours) — the gate and up columns of a 2F-wide `gate_up_proj`: interleaved for GPT-OSS
    (recognised by its bias), halves for Llama 4 (`feed_forward.`). None for other layouts."""
    if _is_gpt_oss(base, keys):
        return lambda f2: {w: GPT_OSS_BIAS[w][1] for w in ("gate", "up")}
    if moe == LLAMA4_MOE and f"{base}.gate_up_proj" in keys:
        return lambda f2: {"gate": slice(0, f2 // 2), "up": slice(f2 // 2, None)}
    return None


def _runs(experts: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending expert ids as maximal [start, stop) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for e in sorted(experts):
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def _no_experts_error(layer_prefix: str, which: str) -> CheckpointError:
    return CheckpointError(
        f"no {which} weights for the experts of {layer_prefix.rstrip('.')}: expected "
        f"{layer_prefix}mlp.experts.0.{PER_EXPERT_NAMES[which][1]}.weight, "
        f"{layer_prefix}block_sparse_moe.experts.0.{PER_EXPERT_NAMES[which][0]}.weight or "
        f"{layer_prefix}mlp.experts.gate_up_proj / down_proj"
    )


def expert_matrices(
    layer_prefix: str,
    which: str,
    keys: Mapping[str, object],
    get: Getter,
    num_experts: int,
    experts: Sequence[int],
    get_rows: RowGetter | None,
) -> dict[int, np.ndarray]:
    """One projection of the experts `experts`, each in our layout ([D, F] gate/up, [F, D] down).

    Per-expert files: only those experts' tensors are read (all must still be listed). Fused files:
    only those experts' rows when `get_rows` is given (safetensors reads just their bytes).
    """
    wanted = set(experts)
    for moe in MOE_PREFIXES:
        base = f"{layer_prefix}{moe}.experts"
        fused = f"{base}.gate_up_proj" if which in ("gate", "up") else f"{base}.down_proj"
        cols = _transposed_gate_up_columns(moe, base, keys)
        if fused in keys and cols is not None:
            out = {}
            for a, b in _runs(wanted):
                t = get_rows(fused, a, b) if get_rows else get(fused)[a:b]
                for j in range(t.shape[0]):
                    m = t[j] if which == "down" else t[j][:, cols(t.shape[2])[which]]
                    out[a + j] = np.ascontiguousarray(m)
            return out
        if fused in keys:
            out: dict[int, np.ndarray] = {}
            blocks = (
                [(a, get_rows(fused, a, b)) for a, b in _runs(wanted)]
                if get_rows
                else [(0, get(fused))]
            )
            for start, t in blocks:
                if t.ndim != 3 or (get_rows is None and t.shape[0] != num_experts):
                    raise CheckpointError(
                        f"tensor {fused!r}: expected [E={num_experts}, ...] 3-D, got {t.shape}"
                    )
                for j in range(t.shape[0]):
                    e = start + j
                    if e not in wanted:
                        continue
                    if which == "down":
                        out[e] = t[j].T
                    else:
                        f2 = t.shape[1]
                        out[e] = (t[j, : f2 // 2] if which == "gate" else t[j, f2 // 2 :]).T
            return out
        for name in PER_EXPERT_NAMES[which]:
            if f"{base}.0.{name}.weight" in keys:
                out = {}
                for e in range(num_experts):
                    k = f"{base}.{e}.{name}.weight"
                    if k not in keys:
                        raise CheckpointError(f"tensor {k!r} is missing from the checkpoint")
                    if e not in wanted:
                        continue
                    m = get(k).T
                    if out:
                        first = min(out)
                        if m.shape != out[first].shape:
                            raise CheckpointError(
                                f"tensor {k!r}: shape {tuple(m.shape[::-1])} differs from expert "
                                f"{first}'s "
                                f"{tuple(out[first].shape[::-1])}"
                            )
                    out[e] = m
                return out
    raise _no_experts_error(layer_prefix, which)


def _expert_stack(
    layer_prefix: str, which: str, keys: Mapping[str, object], get: Getter, num_experts: int
) -> np.ndarray:
    """One projection of all experts stacked in our [E, D, F] / [E, F, D] layout, either source
    layout."""
    mats = expert_matrices(layer_prefix, which, keys, get, num_experts, range(num_experts), None)
    return np.ascontiguousarray(np.stack([mats[e] for e in range(num_experts)]))


def read_expert_subset(
    layer_prefix: str,
    which: str,
    keys: Mapping[str, object],
    get: Getter,
    get_rows: RowGetter | None,
    shape: Sequence[int],
    dtype: np.dtype,
    experts: Sequence[int],
) -> np.ndarray:
    """Our [E, ...] stack of `shape` with the experts `experts` read and every other entry zero.

    For multi-process runs: each process reads only the experts its devices own and the layer is
    completed by an all-gather, so the checkpoint is read once in total, not once per process.
    """
    out = np.zeros(tuple(shape), dtype)
    for e, m in expert_matrices(
        layer_prefix, which, keys, get, int(shape[0]), experts, get_rows
    ).items():
        if m.shape != tuple(shape[1:]):
            raise CheckpointError(
                f"experts of {layer_prefix.rstrip('.')}: {which} of expert {e} has shape {m.shape} "
                "in our layout, "
                f"expected {tuple(shape[1:])} from config.json"
            )
        out[e] = m
    return out


def param_candidates(path: Path, layer_prefix: str) -> tuple[list[str], bool]:
    """(the HF keys that may hold our non-expert parameter `path`, in order of preference;
    whether the HF tensor is its transpose)."""
    if path == ("mlp", "router", "kernel"):
        gates = [f"{layer_prefix}{moe}.gate.weight" for moe in MOE_PREFIXES[:2]]
        routers = [f"{layer_prefix}{moe}.router.weight" for moe in ("mlp", LLAMA4_MOE)]
        return [*gates, *routers], True  # GPT-OSS: mlp.router; Llama 4: feed_forward.router
    if path == ("mlp", "router", "e_score_correction_bias"):
        return [f"{layer_prefix}mlp.gate.e_score_correction_bias"], False
    suffix, transpose = _hf_generic(path)
    if len(path) > 2 and path[:2] == ("mlp", "shared_expert"):
        names = _shared_names(suffix.split("."))
        return [layer_prefix + c for c in names] + [
            f"{layer_prefix}{LLAMA4_MOE}.{c.split('.', 1)[1]}" for c in names[:1]
        ], transpose
    if path[0] == "mlp":  # dense MLP layers: Llama 4 names them feed_forward
        return [layer_prefix + suffix, f"{layer_prefix}{LLAMA4_MOE}.{suffix[4:]}"], transpose
    return [layer_prefix + suffix], transpose


def expert_tensor_shapes(
    layer_prefix: str,
    which: str,
    keys: Mapping[str, object],
    num_experts: int,
    matrix_shape: Sequence[int],
) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, the shape config.json implies for it) of every tensor that holds one projection of
    a layer's experts, in the layout the checkpoint uses (the key resolution of
    `expert_matrices`): what a pre-flight check compares the headers with, reading no values.

    `matrix_shape` is one expert's matrix in our layout ([D, F] gate/up, [F, D] down).
    """
    rows, cols = (int(s) for s in matrix_shape)
    for moe in MOE_PREFIXES:
        base = f"{layer_prefix}{moe}.experts"
        if _transposed_gate_up_columns(moe, base, keys) is not None:
            if which == "down":
                return [(f"{base}.down_proj", (num_experts, rows, cols))]
            return [(f"{base}.gate_up_proj", (num_experts, rows, 2 * cols))]
        if which in ("gate", "up") and f"{base}.gate_up_proj" in keys:
            return [(f"{base}.gate_up_proj", (num_experts, 2 * cols, rows))]
        if which == "down" and f"{base}.down_proj" in keys:
            return [(f"{base}.down_proj", (num_experts, cols, rows))]
        for name in PER_EXPERT_NAMES[which]:
            if f"{base}.0.{name}.weight" in keys:
                return [(f"{base}.{e}.{name}.weight", (cols, rows)) for e in range(num_experts)]
    raise _no_experts_error(layer_prefix, which)


def pairs_to_halves(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """q/k kernel [D, H·d] whose heads rotate interleaved pairs (Llama 4's complex RoPE: dims 2j,
    2j+1 by frequency j) -> the same heads in rotate-half order (dims j, j+d/2), which our RoPE
    uses. Attention scores are unchanged: q and k are permuted alike, and Llama 4's weightless
    q/k norm is permutation-invariant."""
    d, hd = kernel.shape[0], head_dim
    return np.ascontiguousarray(
        kernel.reshape(d, -1, hd // 2, 2).transpose(0, 1, 3, 2).reshape(kernel.shape)
    )


def read_param(
    path: Path, layer_prefix: str, keys: Mapping[str, object], get: Getter, num_experts: int
) -> np.ndarray:
    """Read the HF tensor(s) behind our parameter `path` (relative to a layer or the model root)."""
    if len(path) == 3 and path[:2] == ("mlp", "experts"):
        return _expert_stack(layer_prefix, path[2], keys, get, num_experts)
    if len(path) == 3 and path[:2] == ("mlp", "expert_bias"):
        key, cols = expert_bias_key(layer_prefix, path[2])
        if key not in keys:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
        return np.ascontiguousarray(get(key)[:, cols])
    candidates, transpose = param_candidates(path, layer_prefix)
    for k in candidates:
        if k in keys:
            t = get(k)
            return np.ascontiguousarray(t.T) if transpose else t
    raise CheckpointError(f"tensor {candidates[0]!r} is missing from the checkpoint")


def write_param(
    path: Path, layer_prefix: str, value: np.ndarray, family: str
) -> dict[str, np.ndarray]:
    """Our parameter -> HF tensors in the per-expert layout transformers writes (for export)."""
    if family in ("gpt_oss", "llama4_text"):
        raise CheckpointError(
            f"exporting {family} to Hugging Face files is not supported (its experts are stored "
            "fused and transposed)"
        )
    if len(path) == 3 and path[:2] == ("mlp", "experts"):
        moe, names = ("block_sparse_moe", 0) if family == "mixtral" else ("mlp", 1)
        name = PER_EXPERT_NAMES[path[2]][names]
        return {
            f"{layer_prefix}{moe}.experts.{e}.{name}.weight": np.ascontiguousarray(value[e].T)
            for e in range(value.shape[0])
        }
    if path == ("mlp", "router", "kernel"):
        moe = "block_sparse_moe" if family == "mixtral" else "mlp"
        return {f"{layer_prefix}{moe}.gate.weight": np.ascontiguousarray(value.T)}
    if path == ("mlp", "router", "e_score_correction_bias"):
        return {f"{layer_prefix}mlp.gate.e_score_correction_bias": value}
    suffix, transpose = _hf_generic(path)
    if len(path) > 2 and path[:2] == ("mlp", "shared_expert"):
        suffix = _shared_names(suffix.split("."))[0 if family in ("qwen2_moe", "qwen3_next") else 1]
    return {layer_prefix + suffix: np.ascontiguousarray(value.T) if transpose else value}


TOP_LEVEL = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
    ("norm", "weight"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}
