"""Quantized checkpoint: packed expert factors + stored bases + the rest of the model, and its
loader.

Layout of a quantized directory (written atomically by the pipeline):

    quantized.json          format, model config, quantization config, per-layer factor layouts,
                            effective bits, package versions
    params/top/             orbax: embeddings, final norm, lm_head (bf16 by default)
    params/layer_000/       orbax: {"dense": non-expert params of the layer,
                                    "experts_q": {"basis": the shared bases,
                                                  "factors": {proj: {"perm"}}} (MoE layers),
                                    "allocation": bits per unit [E, r_full] per projection (MoE
                                    layers)}
    params/layer_000_experts/group_000.bin/.json, group_001...
                            MoE layers: the packed factors of a group of consecutive experts,
                            {proj: {"payload": {b: rows}, "scales": {b: rows}}} — each bit-width's
                            rows of the group's units, in unit order (the slices of the layer's
                            segments that hold those units) — as `io.arrayfile` files (raw bytes
                            and a JSON index: any process can write them, and they are read
                            memory-mapped; orbax writes numpy arrays from process 0 only)

The layer's factors are split into groups of `expert_group_size` consecutive experts (at most
`MAX_EXPERT_GROUPS` a layer; the size is in the layer's `quantized.json` entry) so that the
processes of a multi-process run each write their own experts' groups and no host ever holds the
whole packed layer; `load_layer_experts` joins them into the layer's segments — the same arrays, bit
for bit, as one `PackedMatrix` of every expert, whose permutation the layer item holds. Format
version 1 (the whole `PackedMatrix` in the layer item) still loads.
    tokenizer.json, ...     copied from the source so `evaluate` works on the directory
    report.json, report.md  written by the pipeline
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bitsmoe_jax.io import arrayfile
from bitsmoe_jax.io.checkpoint import intify_layer_keys, load_tree, save_tree
from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.packing import (
    PackedMatrix,
    PackedRows,
    assemble_packed,
    num_words,
    unit_bits,
    unit_rows,
)
from bitsmoe_jax.models.assemble import model_from_parts
from bitsmoe_jax.models.config import ModelConfig
from bitsmoe_jax.serve.quantized_experts import FactorMeta, QuantizedExperts, set_backend

FORMAT_QUANTIZED = "bitsmoe-jax/quantized"
QUANT_META = "quantized.json"
FORMAT_VERSION = 2  # 2: a layer's packed factors in groups of experts; 1: in the layer item
#: A MoE layer's packed factors are written in at most this many groups of consecutive experts.
MAX_EXPERT_GROUPS = 16


def package_versions() -> dict[str, str]:
    out = {}
    for name in (
        "bitsmoe-jax",
        "jax",
        "jaxlib",
        "flax",
        "orbax-checkpoint",
        "numpy",
        "cvxpy",
        "highspy",
    ):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def expert_group_size(num_experts: int, process_starts: Sequence[int] = ()) -> int:
    """Experts per written group of a layer: a power of two, at most `MAX_EXPERT_GROUPS` groups,
    and dividing each process's first expert (`process_starts`), so that every group is written
    by the one process that holds its experts. A function of the expert count alone unless a
    process holds fewer experts than a group — so meshes of few processes (1 × 1, 1 × 4, 2 × 2)
    write the same files."""
    padded = 1
    while padded < num_experts:
        padded *= 2
    size = max(1, padded // MAX_EXPERT_GROUPS)
    while size > 1 and any(int(s) % size for s in process_starts):
        size //= 2
    return size


def expert_groups(num_experts: int, size: int) -> list[tuple[int, int]]:
    """(first expert, end) of each group of `size` consecutive experts."""
    return [(lo, min(lo + size, num_experts)) for lo in range(0, num_experts, size)]


def groups_dir(root: str | Path, index: int) -> Path:
    """The directory of layer `index`'s groups of experts."""
    return Path(root) / "params" / f"layer_{index:03d}_experts"


def _group_name(k: int) -> str:
    return f"group_{k:03d}"


def _load_group(root: Path, index: int, k: int) -> dict:
    d, name = groups_dir(root, index), _group_name(k)
    if not (d / f"{name}.json").is_file() or not (d / f"{name}.bin").is_file():
        raise FileNotFoundError(f"{d / name}.json/.bin: a group of experts is missing")
    return arrayfile.load(d, name, mmap=True)[0]


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """The packed factors of experts `first` .. `first + count - 1` of a layer, one
    `PackedMatrix` per projection (units expert-major): the whole layer, or one process's part."""

    first: int
    count: int
    packed: dict[str, PackedMatrix]

    @classmethod
    def whole(cls, experts: QuantizedExperts) -> ExpertShard:
        """Every expert of a layer's block, its arrays moved to the host (slices of device arrays
        would compile a program per distinct slice)."""
        return cls(
            0,
            experts.num_experts,
            {p: jax.tree.map(np.asarray, experts.packed_matrix(p)) for p in PROJECTIONS},
        )

    @functools.cached_property
    def _bits(self) -> dict[str, np.ndarray]:
        """Each projection's bits per unit: computed once, not per group written."""
        return {p: pm.bits_per_unit() for p, pm in self.packed.items()}

    def rows(self, p: str, lo: int, hi: int) -> PackedRows:
        """Projection `p`'s packed rows of experts [lo, hi) (within this shard)."""
        pm = self.packed[p]
        r = pm.num_units // self.count
        return unit_rows(pm, (lo - self.first) * r, (hi - self.first) * r, self._bits[p])


@dataclasses.dataclass(frozen=True)
class LayerHead:
    """What a layer's item holds of its experts — the shared bases and each projection's
    permutation and segments — without the packed rows: enough to count the layer's stored bits
    and decode bytes and to join its groups, for a writer that holds only some experts' rows."""

    num_experts: int
    bases: dict[str, dict[str, np.ndarray]]
    perms: dict[str, np.ndarray]
    factors: dict[str, FactorMeta]

    @classmethod
    def of(cls, experts: QuantizedExperts) -> LayerHead:
        arrays = experts.stored_arrays()
        return cls(
            experts.num_experts,
            {p: {k: np.asarray(v) for k, v in arrays["basis"][p].items()} for p in PROJECTIONS},
            {p: np.asarray(arrays["factors"][p]["perm"]) for p in PROJECTIONS},
            dict(zip(PROJECTIONS, experts.meta, strict=True)),
        )

    @classmethod
    def of_shards(
        cls, bases: dict[str, dict[str, np.ndarray]], shards: Sequence[tuple[np.ndarray, dict]]
    ) -> LayerHead:
        """The head of the layer whose consecutive experts' shards (from the first expert on)
        have these (permutation per projection, `QuantizedExperts.tree_meta()`): its permutation
        is the stable sort of the joined units' widths, as `packing.assemble_packed` makes it."""
        perms, factors = {}, {}
        for p in PROJECTIONS:
            bits = np.concatenate(
                [
                    unit_bits(perm[p], m["factors"][p]["seg_bits"], m["factors"][p]["seg_sizes"])
                    for perm, m in shards
                ]
            )
            perms[p] = np.argsort(bits, kind="stable").astype(np.int32)
            seg_bits, seg_sizes = np.unique(bits, return_counts=True)
            m0 = shards[0][1]["factors"][p]
            factors[p] = FactorMeta(
                int(m0["n"]),
                int(m0["group_size"]),
                tuple(int(b) for b in seg_bits),
                tuple(int(c) for c in seg_sizes),
            )
        return cls(sum(int(m["num_experts"]) for _, m in shards), bases, perms, factors)

    def shape_only(self, p: str) -> PackedMatrix:
        """Projection `p`'s `PackedMatrix` with zero-stride stand-ins of its payload and scales:
        the right shapes and dtypes (what `stored_bits` and `read_bytes` count), no memory."""
        m = self.factors[p]
        payload, scales = [], []
        for b, k in zip(m.seg_bits, m.seg_sizes, strict=True):
            if b == 16:
                shape, dtype, groups = (k, m.n), ml_dtypes.bfloat16, 0
            else:
                shape, dtype = (k, num_words(m.n, b) if b else 0), np.uint32
                groups = -(-m.n // m.group_size) if b else 0
            payload.append(np.broadcast_to(np.zeros((), dtype), shape))
            scales.append(np.broadcast_to(np.zeros((), ml_dtypes.bfloat16), (k, groups)))
        return PackedMatrix(
            self.perms[p], tuple(payload), tuple(scales), m.n, m.group_size, m.seg_bits, m.seg_sizes
        )

    def stored_bits(self) -> int:
        """Every stored bit of the layer's experts (`QuantizedExperts.stored_bits`)."""
        return sum(
            8 * basis_lib.basis_nbytes(self.bases[p]) + self.shape_only(p).stored_bits()
            for p in PROJECTIONS
        )

    def stored_arrays(self) -> dict:
        """`QuantizedExperts.stored_arrays()`'s structure with stand-ins for the packed rows (for
        `read_bytes.layer_read_bytes`, which reads only the permutations)."""
        return {
            "basis": self.bases,
            "factors": {p: _factor_tree(self.shape_only(p)) for p in PROJECTIONS},
        }

    def meta(self, group_size: int) -> dict[str, Any]:
        """The layer's `quantized.json` entry."""
        return {
            "num_experts": self.num_experts,
            "factors": {p: self.factors[p].to_json() for p in PROJECTIONS},
            "expert_group_size": int(group_size),
        }


def save_layer_head(
    root: Path,
    index: int,
    dense: dict,
    head: LayerHead | None,
    allocation: dict[str, np.ndarray] | None,
    group_size: int = 1,
) -> dict[str, Any] | None:
    """Write one layer's item (its dense params; for a MoE layer also its experts' bases,
    permutations and allocation); return the layer's `quantized.json` entry (None if dense). The
    packed rows go to the groups (`save_expert_groups`)."""
    tree: dict[str, Any] = {"dense": dense}
    meta = None
    if head is not None:
        tree["experts_q"] = {
            "basis": head.bases,
            "factors": {p: {"perm": head.perms[p]} for p in PROJECTIONS},
        }
        tree["allocation"] = {k: np.asarray(v, np.int8) for k, v in (allocation or {}).items()}
        meta = head.meta(group_size)
    save_tree(root / "params" / f"layer_{index:03d}", tree)
    return meta


def save_expert_groups(
    root: Path,
    index: int,
    num_experts: int,
    group_size: int,
    shards: Sequence[ExpertShard],
    groups: Sequence[int] | None = None,
) -> None:
    """Write groups `groups` (all by default) of layer `index` from the `shards` that hold their
    experts (a group may take its rows from several shards, in expert order)."""
    spans = expert_groups(num_experts, group_size)
    for k in range(len(spans)) if groups is None else groups:
        lo, hi = spans[k]
        tree: dict[str, Any] = {}
        for p in PROJECTIONS:
            parts = [
                s.rows(p, max(lo, s.first), min(hi, s.first + s.count))
                for s in shards
                if s.first < hi and lo < s.first + s.count
            ]
            if sum(len(r.bits) for r in parts) == 0:
                raise ValueError(f"layer {index}: no packed rows for experts {lo}-{hi - 1}")
            # the group's rows of each width, in unit order: the segments of its units' matrix
            first = shards[0].packed[p]
            pm = assemble_packed(parts, first.n, first.group_size)
            tree[p] = {
                "payload": dict(zip(map(str, pm.seg_bits), pm.payload, strict=True)),
                "scales": dict(zip(map(str, pm.seg_bits), pm.scales, strict=True)),
            }
        d = groups_dir(root, index)
        d.mkdir(parents=True, exist_ok=True)
        arrayfile.save(d, _group_name(k), tree)


def save_layer(
    root: Path,
    index: int,
    dense: dict,
    experts: QuantizedExperts | None,
    allocation: dict[str, np.ndarray] | None,
    group_size: int | None = None,
) -> dict[str, Any] | None:
    """Write one whole layer — its item and, for a MoE layer, every group of its experts
    (`group_size`: `expert_group_size(E)` by default); return its `quantized.json` entry."""
    if experts is None:
        return save_layer_head(root, index, dense, None, None)
    size = expert_group_size(experts.num_experts) if group_size is None else group_size
    meta = save_layer_head(root, index, dense, LayerHead.of(experts), allocation, size)
    save_expert_groups(root, index, experts.num_experts, size, [ExpertShard.whole(experts)])
    return meta


def load_layer_experts(root: str | Path, index: int, experts_q: dict, meta: dict) -> dict:
    """The layer's whole `experts_q` tree (`QuantizedExperts.to_tree()`'s arrays) from its item's
    `experts_q` and, in format 2, its groups of experts — joined into each projection's segments,
    checked against the permutation the item holds."""
    if "expert_group_size" not in meta:  # format 1: the item holds everything
        return experts_q
    root, e_count = Path(root), int(meta["num_experts"])
    spans = expert_groups(e_count, int(meta["expert_group_size"]))
    groups = [_load_group(root, index, k) for k in range(len(spans))]
    factors = {}
    for p in PROJECTIONS:
        m, perm = meta["factors"][p], np.asarray(experts_q["factors"][p]["perm"])
        bits = unit_bits(perm, m["seg_bits"], m["seg_sizes"])
        r = len(perm) // e_count
        parts = [
            PackedRows(
                bits[lo * r : hi * r],
                {int(b): a for b, a in g[p].get("payload", {}).items()},
                {int(b): a for b, a in g[p].get("scales", {}).items()},
            )
            for (lo, hi), g in zip(spans, groups, strict=True)
        ]
        for k, ((lo, hi), part) in enumerate(zip(spans, parts, strict=True)):
            counts = {int(b): int((part.bits == b).sum()) for b in np.unique(part.bits)}
            if counts != {b: len(a) for b, a in part.payload.items()}:
                held = {b: len(a) for b, a in part.payload.items()}
                raise ValueError(
                    f"{groups_dir(root, index) / _group_name(k)}.bin: {p} rows by width {counts} "
                    f"expected for experts {lo}-{hi - 1}, the group holds {held}"
                )
        factors[p] = _factor_tree(assemble_packed(parts, int(m["n"]), int(m["group_size"])))
    return {"basis": experts_q.get("basis", {}), "factors": factors}


def _factor_tree(pm: PackedMatrix) -> dict:
    """A projection's entry of `QuantizedExperts.to_tree()`'s "factors"."""
    return {
        "perm": pm.perm,
        "payload": {str(i): a for i, a in enumerate(pm.payload)},
        "scales": {str(i): a for i, a in enumerate(pm.scales)},
    }


def save_top(root: Path, top: dict) -> None:
    save_tree(root / "params" / "top", top)


def write_meta(
    root: Path, config: ModelConfig, quant_config: dict, layers: dict[int, Any], summary: dict
) -> None:
    meta = {
        "format": FORMAT_QUANTIZED,
        "version": FORMAT_VERSION,
        "config": json.loads(config.to_json()),
        "quantization": quant_config,
        "layers": {str(i): m for i, m in layers.items()},
        "summary": summary,
        "package_versions": package_versions(),
    }
    (root / QUANT_META).write_text(json.dumps(meta, indent=1, default=json_default))


def json_default(o: Any) -> Any:
    """`json.dumps`'s `default` for the numpy scalars and arrays our metadata holds."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / QUANT_META
    if not p.is_file():
        raise FileNotFoundError(f"{p}: not a quantized checkpoint (no {QUANT_META})")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT_QUANTIZED:
        raise ValueError(
            f"{p}: unknown format {meta.get('format')!r} (expected {FORMAT_QUANTIZED})"
        )
    return meta


def load_allocation(path: str | Path, index: int) -> dict[str, np.ndarray]:
    """Bits per unit of a layer, [E, r_full] per projection."""
    return load_tree(Path(path) / "params" / f"layer_{index:03d}")["allocation"]


def load_quantized(
    path: str | Path,
    dtype: Any = jnp.float32,
    backend: str = "auto",
    max_padding: float = 0.05,
):
    """A model with quantized experts, same call contract as `load_model`: returns (model, config).

    ``backend`` selects the routed-expert backend (`quantized_experts.QuantizedExperts`): ``"xla"``,
    ``"triton"``, ``"mosaic_tpu"``, ``"reference"`` or ``"auto"`` (the platform's kernels where they
    are verified, else XLA); a kernel layout is derived here, padded to shapes shared by the layers
    (at most ``max_padding`` extra device memory per group: see `quantized_experts.set_backend`).
    """
    p = Path(path)
    meta = read_meta(p)
    config = ModelConfig.from_json(json.dumps(meta["config"]))
    parts: dict[Any, dict] = {"top": load_tree(p / "params" / "top")}
    experts: dict[int, QuantizedExperts] = {}
    for i in range(config.num_hidden_layers):
        tree = load_tree(p / "params" / f"layer_{i:03d}")
        parts[i] = intify_layer_keys(tree["dense"])
        if "experts_q" in tree:
            layer_meta = meta["layers"][str(i)]
            arrays = load_layer_experts(p, i, tree["experts_q"], layer_meta)
            experts[i] = QuantizedExperts.from_tree(arrays, layer_meta)
    model = model_from_parts(config, parts, dtype, experts=experts)
    set_backend(model, backend, max_padding=max_padding)
    return model, config
