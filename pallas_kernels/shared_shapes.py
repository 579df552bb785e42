"""One compiled kernel for many layers: pad the layers' kernel layouts to a shared shape.

Why --- A kernel layout's array shapes (tiles, word rows, work items, 16-bit units) and its code
widths are static to the kernels, and every MoE layer's allocation gives different ones. Each layer
would then compile its own kernels: pip Triton takes about 22 s for gate/up and 6 s for down on this
workplace's CPU, so about 16 minutes for Mixtral's 32 layers before the first token, per row-tile
size (`bench/shared_kernels.py --compile`; 2 kernels instead of 49–64 once shared). Layers whose
layouts are padded to one shape lower to identical kernels: `api.swiglu_experts` traces them once (a
nested ``jax.jit`` reuses its jaxpr, and lowering reuses the function), and XLA's GPU compiler keys
its kernel cache on the Triton call's text, so it builds each distinct kernel once per executable.

What padding costs
------------------
Memory, not bandwidth. Padding adds tiles that no expert
references, word rows past the last tile, index-table columns that repeat an expert's last entry
(the kernels stop at each expert's own count), zero 16-bit units, and empty code widths (a loop of
zero trips). The bytes a token reads do not change. `plan_groups` puts layers into groups, padding
each group to its members' elementwise largest shape, and starts a new group rather than let the
padding pass ``max_padding`` of the group's own bytes. Layers whose unpaddable statics differ (unit
length, group size, tile sizes) never share. Ranks may differ (a checkpoint keeps the components
with bits in each layer): the largest is taken, and the extra components are in no tile (zero
activations in, dropped out).

Padding rules per field (axis, fill): ``"zero"`` pads with 0; ``"edge"`` repeats the last column
(the layouts' own convention for per-expert tables); ``"dead"`` pads with ``r`` (no component);
``"absent"`` with ``L·tile`` (the zero column of components not in the kernel). Both markers are
also remapped where they already occur, since ``r`` and ``L`` grow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from pallas_kernels.mosaic_tpu.layout import PlaneTiles
from pallas_kernels.triton.layout import CodeTiles

# field -> (axis, fill); fields not listed keep their shape. Fills: "zero"; "edge" (repeat the last
# column); "dead" (``r``, the marker of no component); "absent" (``L·tile``, the zero column of
# components not in the kernel).
_COMMON = {
    "scales": (-1, "zero"),
    "tile_bits": (0, "zero"),
    "expert_tiles": (1, "edge"),
    "kernel_comp": (1, "dead"),
    "comp_pos": (1, "absent"),
    "dense16": (1, "zero"),
    "comp16": (1, "dead"),
}
PAD_RULES: dict[type, dict[str, tuple[int, str]]] = {
    CodeTiles: {**_COMMON, "words": (0, "zero"), "tile_row0": (0, "zero")},
    PlaneTiles: {
        **_COMMON,
        "words": (0, "zero"),
        "tile_q0": (0, "zero"),
        **{f"step_{k}": (1, "edge") for k in ("q", "tile", "local", "plane", "fblock")},
    },
}
# static fields that may differ within a group: merged (union of widths, largest rank), not required
# equal
_MERGED_META = {"widths", "r"}


def _data_fields(layout) -> list[str]:
    """The array fields (numpy, device or abstract arrays)."""
    return [f.name for f in dataclasses.fields(layout) if hasattr(getattr(layout, f.name), "shape")]


def _meta_fields(layout) -> list[str]:
    """The static fields (ints, strings, tuples)."""
    return [
        f.name for f in dataclasses.fields(layout) if not hasattr(getattr(layout, f.name), "shape")
    ]


def static_key(layout) -> tuple:
    """What must be equal for two layouts of one projection to share a shape: the class, its statics
    other than the merged ones, and the shapes of the fields that are never padded."""
    meta = tuple((f, getattr(layout, f)) for f in _meta_fields(layout) if f not in _MERGED_META)
    rules = PAD_RULES[type(layout)]
    fixed = tuple(
        (f, tuple(getattr(layout, f).shape)) for f in _data_fields(layout) if f not in rules
    )
    return (type(layout).__name__, meta, fixed)


def abstract(tree):
    """A layout, or any pytree of them (`api.ExpertKernels`), with every array replaced by its
    `jax.ShapeDtypeStruct`: a shape target, or the arguments `jax.export` needs."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(tuple(a.shape), np.dtype(a.dtype)), tree)


def merged(a, b):
    """The smallest abstract layout both ``a`` and ``b`` pad to (elementwise largest shapes, union
    of
    widths, largest rank)."""
    if static_key(a) != static_key(b):
        raise ValueError(
            "these layouts cannot share a shape: their unit length, group size or tiles differ"
        )
    out = {}
    for f, (axis, _) in PAD_RULES[type(a)].items():
        sa, sb = getattr(a, f).shape, getattr(b, f).shape
        shape = list(sa)
        shape[axis] = max(sa[axis], sb[axis])
        out[f] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(getattr(a, f).dtype))
    if "widths" in _meta_fields(a):
        out["widths"] = tuple(sorted(set(a.widths) | set(b.widths)))
    out["r"] = max(a.r, b.r)
    return dataclasses.replace(abstract(a), **out)


def nbytes(layout) -> int:
    """Bytes of every array of a (possibly abstract) layout: what it holds in device memory."""
    return sum(
        int(np.prod(getattr(layout, f).shape)) * np.dtype(getattr(layout, f).dtype).itemsize
        for f in _data_fields(layout)
    )


def _padded_array(a: np.ndarray, axis: int, size: int, fill: str, value: int) -> np.ndarray:
    a = np.asarray(a)
    axis = axis % a.ndim
    extra = size - a.shape[axis]
    if extra < 0:
        raise ValueError(f"cannot pad an axis of {a.shape[axis]} down to {size}")
    if extra == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    if fill == "edge":
        return np.pad(a, widths, mode="edge")
    return np.pad(a, widths, constant_values=value)


def pad_layout(layout, target):
    """``layout`` (numpy or device arrays) padded to the abstract ``target`` -> numpy arrays.

    A larger rank ``r`` (layers keep different numbers of components) adds components that are in
    no tile: the caller pads ``zg``/``zu`` with zero columns and drops the extra ``acc`` columns
    (`serve.quantized_experts.QuantizedExperts` does). Same products as ``layout`` otherwise:
    `tests/kernels/test_shared_shapes.py` checks the kernels on both against the reference."""
    if static_key(layout) != static_key(target):
        raise ValueError(
            "pad_layout: the target has other statics (unit length, group size or tiles)"
        )
    if "widths" in _meta_fields(layout) and not set(layout.widths) <= set(target.widths):
        raise ValueError(f"pad_layout: target widths {target.widths} lack some of {layout.widths}")
    if target.r < layout.r:
        raise ValueError(f"pad_layout: cannot pad rank {layout.r} down to {target.r}")
    tile = layout.tile
    old_absent, absent = layout.max_tiles * tile, target_shape(target, "expert_tiles")[1] * tile
    out: dict[str, Any] = {f: np.asarray(getattr(layout, f)) for f in _data_fields(layout)}
    # the markers move with the sizes they point past: r (no component) and L·tile (the zero column)
    for f, old, new in (
        ("kernel_comp", layout.r, target.r),
        ("comp16", layout.r, target.r),
        ("comp_pos", old_absent, absent),
    ):
        out[f] = np.where(out[f] == old, new, out[f]).astype(out[f].dtype)
    values = {"zero": 0, "edge": 0, "dead": target.r, "absent": absent}
    for f, (axis, fill) in PAD_RULES[type(layout)].items():
        out[f] = _padded_array(out[f], axis, target_shape(target, f)[axis], fill, values[fill])
    out["r"] = target.r
    if "widths" in _meta_fields(layout):
        out["widths"] = tuple(target.widths)
    return dataclasses.replace(layout, **out)


def target_shape(target, field: str) -> tuple[int, ...]:
    return tuple(getattr(target, field).shape)


# ------------------------------------------------------------------------------------------ groups
# of layers
@dataclasses.dataclass(frozen=True)
class SharedShapes:
    """Which shape each layer pads to. ``targets[g]`` is a tuple of abstract layouts (one per
    projection); ``group_of[i]`` is layer ``i``'s group. Bytes are summed over all layers."""

    targets: tuple[tuple[Any, ...], ...]
    group_of: tuple[int, ...]
    bytes_unpadded: int
    bytes_padded: int

    @property
    def num_groups(self) -> int:
        return len(self.targets)

    @property
    def padding(self) -> float:
        """Extra device memory over the unpadded layouts, as a fraction."""
        return self.bytes_padded / max(self.bytes_unpadded, 1) - 1.0

    def summary(self) -> str:
        n = len(self.group_of)
        mib = (self.bytes_padded - self.bytes_unpadded) / 2**20
        return (
            f"kernel layouts: {n} layers in {self.num_groups} shape group(s), so {self.num_groups} "
            "compile(s) "
            f"per kernel and row-tile size; padding +{100 * self.padding:.1f} % ({mib:.1f} MiB)"
        )


def plan_groups(layers: list[tuple[Any, ...]], max_padding: float = 0.05) -> SharedShapes:
    """Group layers (each a tuple of per-projection layouts, real or abstract) to share shapes.

    Greedy, largest layer first: a layer joins the open group of its statics if the group's padded
    bytes stay within ``(1 + max_padding)`` of its members' own bytes, else it opens a new group.
    ``max_padding = 0`` shares only identical shapes; ``inf`` gives one group per set of statics.
    """
    if max_padding < 0:
        raise ValueError(f"max_padding must be ≥ 0, got {max_padding}")
    absl = [tuple(abstract(p) for p in layer) for layer in layers]
    own = [sum(nbytes(p) for p in layer) for layer in absl]
    keys = [tuple(static_key(p) for p in layer) for layer in absl]
    order = sorted(range(len(absl)), key=lambda i: -own[i])
    targets: list[tuple[Any, ...]] = []
    members: list[list[int]] = []
    open_group: dict[tuple, int] = {}
    group_of = [0] * len(absl)
    for i in order:
        g = open_group.get(keys[i])
        if g is not None:
            cand = tuple(merged(t, p) for t, p in zip(targets[g], absl[i], strict=False))
            size = sum(nbytes(p) for p in cand) * (len(members[g]) + 1)
            if size <= (1 + max_padding) * (sum(own[j] for j in members[g]) + own[i]):
                targets[g] = cand
                members[g].append(i)
                group_of[i] = g
                continue
        open_group[keys[i]] = len(targets)
        group_of[i] = len(targets)
        targets.append(absl[i])
        members.append([i])
    padded = sum(sum(nbytes(p) for p in targets[g]) * len(m) for g, m in enumerate(members))
    return SharedShapes(tuple(targets), tuple(group_of), sum(own), padded)


__all__ = [
    "PAD_RULES",
    "SharedShapes",
    "abstract",
    "merged",
    "nbytes",
    "pad_layout",
    "plan_groups",
    "static_key",
]
