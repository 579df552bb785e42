"""Checkpoints written the way the hub ships the newest MoE families, from a PyTorch model.

DeepSeek-V3 / R1 / Kimi-K2 (and GLM-4.5-FP8) release every linear weight of attention and
experts in float8 e4m3 with one float32 `weight_scale_inv` per 128×128 block, keep embeddings,
norms, the router and its correction bias in bf16/f32, store one multi-token-prediction layer after
the last decoder layer, and spread the tensors over shards behind `model.safetensors.index.json`.
`write_fp8_hub_checkpoint` does the same to a transformers model (with torch and the safetensors
library: not our writer), and returns the weights the FP8 files hold, dequantized by torch, so a
reference transformers model can be built from exactly those values.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, float32 scale_inv [.., ceil(R/b0), ceil(C/b1)]) with
    w ≈ fp8 · scale per block, the scale mapping each block's largest |w| to e4m3's 448."""
    *lead, r, c = w.shape
    b0, b1 = block
    pr, pc = math.ceil(r / b0) * b0, math.ceil(c / b1) * b1
    padded = torch.zeros(*lead, pr, pc, dtype=torch.float32)
    padded[..., :r, :c] = w.float()
    blocks = padded.reshape(*lead, pr // b0, b0, pc // b1, b1)
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (blocks / scale[..., :, None, :, None]).reshape(*lead, pr, pc)[..., :r, :c]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_fp8_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    r, c = q.shape[-2:]
    s = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return q.float() * s[..., :r, :c]


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] -> (blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32]): the
    hub's layout, a power-of-two scale per 32 inputs mapping the group's max to ≤ 6, nearest
    e2m1 code, low nibble first."""
    t = w.transpose(1, 2).float()  # [E, out, in]
    e, o, i = t.shape
    groups = t.reshape(e, o, i // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    values = groups / torch.exp2(exp)[..., None]
    table = torch.tensor(E2M1)
    codes = (values[..., None] - table).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def is_fp8_linear(key: str, value: torch.Tensor) -> bool:
    """The tensors the DeepSeek-V3 release stores in fp8: linear weights of attention, dense MLPs,
    shared and routed experts — not embeddings, lm_head, norms or the router (`mlp.gate`)."""
    if value.ndim not in (2, 3) or key.startswith("lm_head") or "embed" in key:
        return False
    return "_proj" in key


def _mtp_layer(layer: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A few tensors of DeepSeek-V3's multi-token-prediction layer (`model.layers.61.*`)."""
    p = f"model.layers.{layer}."
    return {
        p + "enorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "hnorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=gen) * 0.05,
        p + "shared_head.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        p + "mlp.experts.0.down_proj.weight": torch.randn(hidden, 8, generator=gen) * 0.05,
    }


def write_fp8_hub_checkpoint(
    model: torch.nn.Module,
    out_dir: Path,
    reference_dir: Path,
    *,
    block: tuple[int, int],
    model_type: str | None = None,
    fused: bool = False,
    mtp_layers: int = 1,
) -> None:
    """Write `model` to `out_dir` as the hub ships FP8 releases and a float32 per-expert copy of
    the dequantized weights to `reference_dir` (what `from_pretrained` of the reference loads).

    fused: experts as transformers 5 holds them (`experts.gate_up_proj` [E, 2F, D],
    `experts.down_proj` [E, D, F]) with 3-D block scales, instead of per-expert tensors.
    """
    plain = out_dir.parent / (out_dir.name + "_plain")
    model.save_pretrained(plain)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(plain.glob("*.safetensors")):
        state.update(load_file(f))
    if fused:
        state = _fuse_experts(state)
    files: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_fp8_linear(key, value):
            q, s = quantize_fp8_blocks(value, block)
            files[key], files[key + "_scale_inv"] = q, s
            reference[key] = dequantize_fp8_blocks(q, s, block)
        else:
            keep = value.float() if (".gate." in key or "bias" in key) else value.to(torch.bfloat16)
            files[key] = keep
            reference[key] = keep.float()
    n_layers = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(7)
    for i in range(mtp_layers):
        for k, v in _mtp_layer(n_layers + i, model.config.hidden_size, gen).items():
            if v.dtype == torch.float32 and v.ndim == 2:
                files[k], files[k + "_scale_inv"] = quantize_fp8_blocks(v, block)
            else:
                files[k] = v
    # Two shards split by layer, as the hub's many: a scale may sit in another shard than its
    # weight (here: layer 0's o_proj scale).
    out_dir.mkdir(parents=True, exist_ok=True)
    odd = next(k for k in files if k.endswith("layers.0.self_attn.o_proj.weight_scale_inv"))
    shard_of = {
        k: (
            "model-00002-of-00002.safetensors"
            if (".layers.0." not in k) != (k == odd)
            else "model-00001-of-00002.safetensors"
        )
        for k in files
    }
    for shard in sorted(set(shard_of.values())):
        save_file(
            {k: v.contiguous() for k, v in files.items() if shard_of[k] == shard},
            out_dir / shard,
            metadata={"format": "pt"},
        )
    index = {"metadata": {}, "weight_map": dict(sorted(shard_of.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    config["num_nextn_predict_layers"] = mtp_layers
    if model_type:
        config["model_type"] = model_type
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))

    reference_dir.mkdir(parents=True, exist_ok=True)
    if fused:
        reference = _unfuse_experts(reference)
    save_file(
        {k: v.contiguous() for k, v in reference.items()}, reference_dir / "model.safetensors"
    )
    shutil.copy(plain / "config.json", reference_dir / "config.json")
    shutil.rmtree(plain)


def _fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `experts.{e}.{gate,up,down}_proj.weight` -> `experts.gate_up_proj` [E, 2F, D]
    (gate rows first) and `experts.down_proj` [E, D, F]."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in state.items():
        head, sep, tail = k.partition(".experts.")
        if not sep or not tail.split(".")[0].isdigit():
            out[k] = v
            continue
        e, name = tail.split(".")[0], tail.split(".")[1]
        groups.setdefault(head, {}).setdefault(int(e), {})[name] = v
    for head, experts in groups.items():
        ids = sorted(experts)
        out[f"{head}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids]
        )
        out[f"{head}.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def _unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(".experts.gate_up_proj"):
            head = k[: -len(".gate_up_proj")]
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{head}.{e}.gate_proj.weight"] = v[e, :f]
                out[f"{head}.{e}.up_proj.weight"] = v[e, f:]
        elif k.endswith(".experts.down_proj"):
            head = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{head}.{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out
