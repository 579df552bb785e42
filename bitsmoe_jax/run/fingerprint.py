"""What a quantization run depends on, so that a work directory is resumed only by the same run.

A fingerprint is a JSON dict of:

* `format_version` of the work directory (`WORK_FORMAT_VERSION`);
* `model_config`: the parsed model config;
* `model_files`: every file of the model directory with its size and a sampled SHA-256 — the first
  MiB (a safetensors header, i.e. the tensor index with names, dtypes, shapes and offsets, plus the
  first tensors) and 16 evenly spaced 64 KiB blocks and the last 64 KiB. That reads about 2 MiB per
  file whatever its size, so fingerprinting a TB checkpoint takes seconds; an edit confined to
  unsampled bytes of a shard that keeps its size is not detected (documented limit);
* `quantization_config`: every config field except those that cannot change the result (output
  location, evaluation, resume/work-dir, process layout: `NOT_FINGERPRINTED`) — a field added later
  is fingerprinted by default;
* `calib_text_sha256`: the content hash of the calibration text (not its name);
* `tokenizer_sha256`: with `tokenizer` set, the hash of that tokenizer.json (not its path);
* `versions`: bitsmoe-jax, jax and jaxlib, whose numerics the results depend on.

`describe_changes(old, new)` lists what changed in words for the refusal message.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from bitsmoe_jax.io.data import read_text
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.run.config_schema import RunConfig

WORK_FORMAT_VERSION = 3  # 2: problems keep their units in units/ (DiskUnits); 3: scope_tables/
HEAD_BYTES = 1 << 20
BLOCK_BYTES = 1 << 16
NUM_BLOCKS = 16
NOT_FINGERPRINTED = frozenset(
    {
        "model_path",
        "calib_text",
        "tokenizer",
        "output_dir",
        "overwrite",
        "eval_text",
        "eval_max_tokens",
        "eval_batch_size",
        "resume",
        "work_dir",
        "distributed",
        "mesh_shape",
        "host_memory_gb",
        "expert_chunk",
        "preflight",
    }
)


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the file's size, its first MiB, 16 evenly spaced 64 KiB blocks and its last 64
    KiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= HEAD_BYTES + (NUM_BLOCKS + 1) * BLOCK_BYTES:
            h.update(f.read())
            return h.hexdigest()
        h.update(f.read(HEAD_BYTES))
        span = size - HEAD_BYTES - BLOCK_BYTES
        for k in range(NUM_BLOCKS):
            f.seek(HEAD_BYTES + k * span // NUM_BLOCKS)
            h.update(f.read(BLOCK_BYTES))
        f.seek(size - BLOCK_BYTES)
        h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()


def model_files(model_path: str | Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256 (sampled)}} for every non-hidden file under the model
    directory."""
    root = Path(model_path)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = {"size": p.stat().st_size, "sha256": sampled_sha256(p)}
    return out


def _versions() -> dict[str, str]:
    out = {}
    for name in ("bitsmoe-jax", "jax", "jaxlib"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def compute(run: RunConfig, config: ModelConfig) -> dict[str, Any]:
    """The fingerprint of the run `run` on the model whose config is `config`."""
    quant = {k: v for k, v in run.to_dict().items() if k not in NOT_FINGERPRINTED}
    return {
        "format_version": WORK_FORMAT_VERSION,
        "model_config": _jsonable(json.loads(config.to_json())),
        "model_files": model_files(run.model_path),
        "quantization_config": _jsonable(quant),
        "calib_text_sha256": hashlib.sha256(read_text(run.calib_text).encode()).hexdigest(),
        "versions": _versions(),
    } | (
        # a tokenizer from elsewhere: its content (the model's own is among model_files)
        {"tokenizer_sha256": sampled_sha256(Path(run.tokenizer).expanduser() / "tokenizer.json")}
        if run.tokenizer
        else {}
    )


EVALUATION_FIELDS = ("eval_text", "eval_max_tokens", "eval_batch_size")


def output_digest(fp: dict[str, Any], run: RunConfig) -> str:
    """SHA-256 naming everything a finished output depends on: the run's fingerprint and its
    evaluation.

    Recorded in each output's report as `run_fingerprint`, so that rerunning a command whose outputs
    are all written (say after a kill during the final cleanup) recognises them as its own and does
    nothing, while outputs of any other run still need `--config.overwrite=True`.
    """
    evaluation = {k: _jsonable(getattr(run, k)) for k in EVALUATION_FIELDS}
    return hashlib.sha256(
        json.dumps({"run": fp, "evaluation": evaluation}, sort_keys=True).encode()
    ).hexdigest()


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per change ([] when they match)."""
    changes = []
    if old.get("format_version") != new["format_version"]:
        changes.append(
            f"work-directory format version ({old.get('format_version')} → {new['format_version']})"
        )
    for section, label in (
        ("model_config", "model config field"),
        ("quantization_config", "config field"),
        ("versions", "package version of"),
    ):
        a, b = old.get(section, {}), new[section]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                changes.append(f"{label} {k} ({_short(a.get(k))} → {_short(b.get(k))})")
    a, b = old.get("model_files", {}), new["model_files"]
    for k in sorted(set(a) | set(b)):
        if k not in a:
            changes.append(f"model: file {k} was added")
        elif k not in b:
            changes.append(f"model: file {k} was removed")
        elif a[k]["size"] != b[k]["size"]:
            changes.append(f"model: file {k} changed size ({a[k]['size']} → {b[k]['size']} bytes)")
        elif a[k]["sha256"] != b[k]["sha256"]:
            changes.append(
                f"model: file {k} changed content (sampled sha256 {a[k]['sha256'][:12]} → "
                f"{b[k]['sha256'][:12]})"
            )
    if old.get("calib_text_sha256") != new["calib_text_sha256"]:
        changes.append(
            f"calibration text content (sha256 {str(old.get('calib_text_sha256'))[:12]} → "
            f"{new['calib_text_sha256'][:12]})"
        )
    if old.get("tokenizer_sha256") != new.get("tokenizer_sha256"):
        changes.append(
            f"tokenizer (sha256 {str(old.get('tokenizer_sha256'))[:12]} → "
            f"{str(new.get('tokenizer_sha256'))[:12]})"
        )
    return changes
