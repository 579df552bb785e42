"""Peak host memory of a quantization run against the checkpoint size and the largest layer.

    python bench/memory.py [--layers 40 --hidden 256 --inter 4096 --experts 8] [--work
    /tmp/bitsmoe_memory]

Builds a synthetic random Mixtral checkpoint (bf16, HF safetensors, many shards;
`conversion.synthetic`) with `--layers` layers and a 2-layer one of the same shapes, quantizes each
in a fresh subprocess (`python -m bitsmoe_jax.peak_memory`, the kernel's VmHWM of that process) and
prints a markdown table. The 2-layer run is the floor: the Python/JAX runtime, compiled code, one
layer and the calibration activations. Bounded memory means the big run's peak stays at that floor,
whatever the number of layers — far below the checkpoint, let alone the float32 model the quantizer
computes in.

Settings: one budget (2.0 bpw), `coefficient_mode=sampled` (the paper's fast path) and
`rounding=nearest`, so that a 2-core CPU gets through in minutes, greedy allocation, 2048
calibration tokens of 256, no evaluation (the evaluation loads the whole model by design). Every
stage still runs, layer by layer; what these choices change is the time per layer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bitsmoe_jax.peak_memory import measure
from conversion.synthetic import checkpoint_bytes, write_random_mixtral

ROOT = Path(__file__).resolve().parents[1]


def largest_layer_bytes(model: Path) -> int:
    """bf16 bytes of the largest decoder layer (from the safetensors index and headers)."""
    from conversion.hf_checkpoint import HFCheckpoint

    ckpt = HFCheckpoint(model)
    sizes: dict[str, int] = {}
    for name in ckpt.keys():
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            n = 1
            for s in ckpt.shape(name):
                n *= s
            sizes[layer] = sizes.get(layer, 0) + 2 * n
    return max(sizes.values())


def quantize_args(model: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        f"--config.model_path={model}",
        f"--config.output_dir={out}",
        "--config.budget_bits=2.0",
        "--config.eval_text=",
        "--config.allocator=greedy",
        "--config.coefficient_mode=sampled",
        "--config.rounding=nearest",
        "--config.num_calib_tokens=2048",
        "--config.seq_len=256",
        "--config.overwrite=True",
        *extra,
    ]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shard-mb", type=int, default=200)
    ap.add_argument("--work", default="/tmp/bitsmoe_memory")
    ap.add_argument("--extra", nargs="*", default=[], help="more --config.field=value overrides")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    a = ap.parse_args()
    work = Path(a.work)
    rows = []
    for layers in (2, a.layers):
        model = work / f"mixtral_{layers}x{a.experts}x{a.hidden}x{a.inter}"
        if not (model / "model.safetensors.index.json").is_file():
            shutil.rmtree(model, ignore_errors=True)
            t = time.time()
            write_random_mixtral(
                model, layers, a.hidden, a.inter, a.experts, shard_bytes=a.shard_mb << 20
            )
            print(
                f"wrote {model} ({gib(checkpoint_bytes(model))}) in {time.time() - t:.0f} s",
                flush=True,
            )
        t = time.time()
        res = measure(quantize_args(model, work / f"out_{layers}", a.extra))
        secs = time.time() - t
        rows.append(
            {
                "layers": layers,
                "shards": len(list(model.glob("*.safetensors"))),
                "checkpoint_bytes": checkpoint_bytes(model),
                "largest_layer_bytes": largest_layer_bytes(model),
                "peak_rss_bytes": res["peak_rss_bytes"],
                "seconds": secs,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    floor = rows[0]["peak_rss_bytes"]
    print()
    print(
        "| layers | shards | checkpoint (bf16) | largest layer (bf16 / f32) | peak RSS | peak / "
        "checkpoint | peak / largest layer (f32) | peak − 2-layer peak | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ck, ly, pk = r["checkpoint_bytes"], r["largest_layer_bytes"], r["peak_rss_bytes"]
        print(
            f"| {r['layers']} | {r['shards']} | {gib(ck)} | {ly / 2**20:.0f} / "
            f"{2 * ly / 2**20:.0f} MiB | {gib(pk)} | "
            f"{pk / ck:.2f} | {pk / (2 * ly):.1f} | {(pk - floor) / 2**20:+.0f} MiB | "
            f"{r['seconds']:.0f} s |"
        )
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
