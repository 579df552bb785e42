"""Peak host memory of a quantization run against the checkpoint size and the largest layer.

    python bench/memory.py [--layers 40 --hidden 256 --inter 4096 --experts 8] [--work
    /tmp/bitsmoe_memory]
    python bench/memory.py --real-dims [mixtral-8x7b qwen3-30b-a3b deepseek-v3-e16 ...]

`--real-dims`: one-layer synthetic checkpoints at the expert dimensions of real models (written
tensor by tensor), each quantized in a subprocess; prints peak RSS, time, the bound of issue 18
(peak ≤ 1.5 × the layer's expert bytes in bf16 + 2 GiB) with pass/fail, the DeepSeek-V3 64- vs
16-expert ratio, and a whole-model extrapolation (see `real_dims`).

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
        "--config.scale_tuning_steps=0",
        "--config.num_calib_tokens=2048",
        "--config.seq_len=256",
        "--config.overwrite=True",
        *extra,
    ]


# Expert dimensions of the real models (attention is Mixtral-style GQA in these stand-ins: the
# experts are what the quantizer's memory depends on). DeepSeek-V3 has 256 routed experts; its
# stand-ins have 16 and 64, to show that the peak does not grow with the number of experts.
REAL_DIMS = {
    "mixtral-8x7b": dict(hidden=4096, inter=14336, experts=8, top_k=2, heads=32, kv_heads=8),
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8, heads=32, kv_heads=4),
    "qwen3-235b-a22b": dict(hidden=4096, inter=1536, experts=128, top_k=8, heads=64, kv_heads=4),
    "deepseek-v3-e16": dict(hidden=7168, inter=2048, experts=16, top_k=8, heads=56, kv_heads=8),
    "deepseek-v3-e64": dict(hidden=7168, inter=2048, experts=64, top_k=8, heads=56, kv_heads=8),
}
# (MoE layers, routed experts per layer) of the whole models, for the extrapolation
WHOLE_MODEL = {
    "mixtral-8x7b": (32, 8),
    "qwen3-30b-a3b": (48, 128),
    "qwen3-235b-a22b": (94, 128),
    "deepseek-v3-e16": (58, 256),
    "deepseek-v3-e64": (58, 256),
}


def expert_bytes_bf16(d: dict) -> int:
    return 3 * d["experts"] * d["hidden"] * d["inter"] * 2


def measure_processes(args: list[str], processes: int) -> list[dict]:
    """`args` run as `processes` processes of one multi-process run on this machine (localhost
    coordinator, one CPU device each), concurrently; each process's measurement, in process order.
    One process: the plain command."""
    if processes <= 1:
        return [measure(args)]
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}

    def one(pid: int) -> dict:
        dist = [
            f"--config.distributed.num_processes={processes}",
            f"--config.distributed.process_id={pid}",
            f"--config.distributed.coordinator_address=localhost:{port}",
        ]
        return measure([*args, *dist], env=env)

    with ThreadPoolExecutor(processes) as pool:
        return list(pool.map(one, range(processes)))


def real_dims(
    names: list[str], work: Path, extra: list[str], keep: bool, processes: int = 1
) -> None:
    """Quantize one synthetic layer per name; print the measurements, the bounds and the
    extrapolation to the whole model (per-layer peak; total time = layers × time per layer ×
    experts/layer-stand-in experts, since the per-expert stages dominate; per-process peak with P
    processes = the one-process peak, which the chunk sets and P does not change)."""
    rows = []
    for name in names:
        dims = REAL_DIMS[name]
        model = work / name
        if not (model / "model.safetensors.index.json").is_file():
            shutil.rmtree(model, ignore_errors=True)
            t = time.time()
            write_random_mixtral(
                model,
                1,
                dims["hidden"],
                dims["inter"],
                dims["experts"],
                shard_bytes=1 << 30,
                heads=dims["heads"],
                kv_heads=dims["kv_heads"],
                top_k=dims["top_k"],
            )
            print(f"wrote {model} ({gib(checkpoint_bytes(model))}) in {time.time() - t:.0f} s")
        t = time.time()
        runs = measure_processes(
            quantize_args(model, work / f"out_{name}", ["--config.num_calib_tokens=4096", *extra]),
            processes,
        )
        secs = time.time() - t
        res = runs[0]
        plan = [ln for ln in res["output"].splitlines() if ln.startswith("memory plan")]
        stages = [ln for ln in res["output"].splitlines() if ln.startswith("layer 1/1 done")]
        eb = expert_bytes_bf16(dims)
        bound = 1.5 * eb + 2 * 2**30
        rows.append(
            {
                "name": name,
                "expert_bytes_bf16": eb,
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                "process_peaks_bytes": [r["peak_rss_bytes"] for r in runs],
                "processes": processes,
                "seconds": secs,
                "bound_bytes": bound,
                "plan": plan[0] if plan else "",
                "stages": stages[0] if stages else "",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if not keep:
            shutil.rmtree(work / f"out_{name}", ignore_errors=True)
    print()
    print("| layer | experts (bf16) | peak RSS | bound 1.5×+2 GiB | pass | time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = r["peak_rss_bytes"] <= r["bound_bytes"]
        print(
            f"| {r['name']} | {gib(r['expert_bytes_bf16'])} | {gib(r['peak_rss_bytes'])} | "
            f"{gib(r['bound_bytes'])} | {'yes' if ok else 'NO'} | {r['seconds']:.0f} s |"
        )
    by = {r["name"]: r for r in rows}
    if "deepseek-v3-e16" in by and "deepseek-v3-e64" in by:
        ratio = by["deepseek-v3-e64"]["peak_rss_bytes"] / by["deepseek-v3-e16"]["peak_rss_bytes"]
        print(
            f"\nDeepSeek-V3 dims: peak(64 experts) / peak(16 experts) = {ratio:.2f} "
            f"(bound 1.25: {'pass' if ratio <= 1.25 else 'FAIL'})"
        )
    print()
    print(
        "| model (extrapolated) | MoE layers | per-layer peak | total time, this CPU | "
        "per-process peak, P = 1 / 2 / 8 |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        layers, experts = WHOLE_MODEL[r["name"]]
        per_layer = layer_seconds(r, by, experts)
        pk = gib(r["peak_rss_bytes"])
        print(
            f"| {r['name']} | {layers} | {pk} | {layers * per_layer / 3600:.1f} h | "
            f"{pk} / {pk} / {pk} |"
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def layer_seconds(r: dict, by: dict[str, dict], experts: int) -> float:
    """One whole-model layer's time from a stand-in's. With both DeepSeek-V3 stand-ins measured,
    the time is split into a fixed part (bases' eigendecompositions and inverses, attention,
    allocation) and a per-expert part from their difference, and extrapolated as fixed + 256 ×
    per-expert; otherwise as if all of it grew with the experts (an upper bound)."""
    lo, hi = by.get("deepseek-v3-e16"), by.get("deepseek-v3-e64")
    if r["name"].startswith("deepseek-v3") and lo and hi:
        e_lo, e_hi = (
            REAL_DIMS["deepseek-v3-e16"]["experts"],
            REAL_DIMS["deepseek-v3-e64"]["experts"],
        )
        per = max(hi["seconds"] - lo["seconds"], 0.0) / (e_hi - e_lo)
        fixed = max(lo["seconds"] - e_lo * per, 0.0)
        return fixed + experts * per
    return r["seconds"] * experts / REAL_DIMS[r["name"]]["experts"]


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
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="--real-dims: quantize each layer with this many processes of one run on this "
        "machine (the peak is the largest process's)",
    )
    ap.add_argument(
        "--real-dims",
        nargs="*",
        choices=sorted(REAL_DIMS),
        help="one-layer checkpoints at these real models' expert dims (none listed: all)",
    )
    a = ap.parse_args()
    work = Path(a.work)
    if a.real_dims is not None:
        real_dims(a.real_dims or list(REAL_DIMS), work, a.extra, a.keep, a.processes)
        return
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
