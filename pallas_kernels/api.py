"""The quantized routed-expert product as one op with backends (the tokamax pattern).

    acc = swiglu_experts(zg, zu, group_sizes, weights, backend=...)

Rows ``zg [M, r_g]``, ``zu [M, r_u]`` sorted by expert, ``group_sizes [E]`` → ``acc [M, r_d]``
float32 with ``acc[m] = Bd[e]·(silu(zg[m]·Ag[e]) ⊙ (zu[m]·Au[e]))`` for the expert ``e`` of row
``m``,
on factors that stay packed in memory. ``weights`` is the three projections in the backend's layout
(`ExpertKernels`), made once at load time from the stored `PackedMatrix` format by
`build_expert_kernels(packed, num_experts, backend)`.

Backends (`BACKENDS`), each with its layout beside its kernel:

* ``"reference"`` (`reference`): a per-row einsum on the dequantized factors, float32 at HIGHEST
  precision; quadratic in memory, for tests and debugging. Layout: `xla.PackedFactors`.
* ``"xla"`` (`xla`): the factors dequantized inside the jitted computation, then XLA's grouped
  matmul; every platform. Layout: `xla.PackedFactors` (the stored arrays as they are).
* ``"triton"`` (`triton/`, GPU): decode GEMVs over b-bit integer codes decoded by the float-exponent
  trick; with more rows per expert (prefill) the kernels dequantize each expert's factors once and
  XLA's grouped matmul does the compute-bound product. Layout: `triton.layout.CodeTiles`.
* ``"mosaic_tpu"`` (`mosaic_tpu/`, TPU): gate/up fused with the SiLU gating, then down, over ±1
  bit-planes with scalar prefetch (the megablox scheme). Layout: `mosaic_tpu.layout.PlaneTiles`.
* ``"auto"``: the platform's kernel backend where it has passed the hardware bench
  (`VERIFIED_PLATFORMS`), else ``"xla"``.

The kernel backends also run in interpret mode (CPU tests). Both map the kernel's component order
back the same way (``kernel_comp`` / ``comp_pos``), and send 16-bit components (rare) through a
dense
XLA side product.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitsmoe_jax.method.packing import PackedMatrix
from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.models.moe import SWIGLU, GluActivation
from pallas_kernels import shared_shapes
from pallas_kernels.mosaic_tpu.layout import (
    PlaneTiles,
    TileConfig,
    plane_tiles_from_packed,
    synthetic_plane_tiles,
)
from pallas_kernels.mosaic_tpu.op import mosaic_experts
from pallas_kernels.reference import swiglu_experts_reference
from pallas_kernels.routing import expert_of_rows, gather_rows
from pallas_kernels.triton import kernels as triton_kernels
from pallas_kernels.triton.layout import (
    CodeConfig,
    CodeTiles,
    code_tiles_from_packed,
    synthetic_code_tiles,
)
from pallas_kernels.triton.op import dequantized_experts, gemv_experts
from pallas_kernels.xla import PackedFactors, swiglu_experts_xla

BACKENDS = ("reference", "xla", "triton", "mosaic_tpu")
KERNEL_BACKENDS = ("triton", "mosaic_tpu")

# Tile sizes per kernel backend: TPU needs 8 word rows (tile_rows = 256) and 128-lane blocks; on GPU
# smaller tiles promote fewer boundary components (see layout) and give more programs at decode.
DEFAULT_TILES = {
    "mosaic_tpu": TileConfig(
        tile_rows=256, tile_lanes=128, n_block=2048, f_block=2048, n_block_min=128, f_block_min=256
    ),
    "triton": CodeConfig(tile=128),
}


@dataclasses.dataclass(frozen=True)
class ExpertKernels:
    """The three projections in one backend's layout (a pytree): `PackedFactors` for ``"xla"`` and
    ``"reference"``, `CodeTiles` for ``"triton"``, `PlaneTiles` (gate and up in ``"rows"``, down in
    ``"lanes"`` orientation) for ``"mosaic_tpu"``."""

    gate: PackedFactors | CodeTiles | PlaneTiles
    up: PackedFactors | CodeTiles | PlaneTiles
    down: PackedFactors | CodeTiles | PlaneTiles

    @property
    def family(self) -> str:
        """The backend this layout was built for (``"xla"`` also serves ``"reference"``)."""
        if isinstance(self.down, CodeTiles):
            return "triton"
        return "mosaic_tpu" if isinstance(self.down, PlaneTiles) else "xla"

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    def parts(self) -> tuple:
        """``(gate, up, down)``: the per-projection tuple `shared_shapes.plan_groups` takes."""
        return (self.gate, self.up, self.down)

    def bytes_read(self) -> int:
        return sum(sum(p.bytes_read().values()) for p in self.parts())


jax.tree_util.register_dataclass(ExpertKernels, data_fields=["gate", "up", "down"], meta_fields=[])


# Platforms on which the compiled kernels have passed `bench/kernels.py`'s correctness check on real
# hardware. Until then ``backend="auto"`` keeps the XLA path there: the kernels lower for GPU and
# TPU (tested with jax.export) and match the reference in interpret mode, but a default must not be
# a kernel nobody has run. A session with the device adds its platform after the bench passes.
VERIFIED_PLATFORMS: frozenset[str] = frozenset()


def kernel_backend_for(platform: str | None = None) -> str:
    """The kernel backend of a platform: ``"mosaic_tpu"`` on TPU, ``"triton"`` elsewhere (GPU; on
    CPU the kernels run in interpret mode)."""
    return "mosaic_tpu" if (platform or jax.default_backend()) == "tpu" else "triton"


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """``"auto"`` → the platform's kernel backend once verified there (`VERIFIED_PLATFORMS`), else
    ``"xla"`` (always on CPU: interpret mode is for tests, not speed); any other name is checked."""
    if backend == "auto":
        platform = platform or jax.default_backend()
        kind = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
        verified = kind in ("gpu", "tpu") and kind in VERIFIED_PLATFORMS
        return kernel_backend_for(platform) if verified else "xla"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _tiles_for(
    backend: str, tiles: TileConfig | CodeConfig | None
) -> TileConfig | CodeConfig | None:
    """The kernel backend's tile sizes (defaults filled in), checked against the backend."""
    if backend not in KERNEL_BACKENDS:
        if tiles is not None:
            raise ValueError(f"the {backend!r} backend takes no tile sizes, got {tiles!r}")
        return None
    tiles = tiles or DEFAULT_TILES[backend]
    want = CodeConfig if backend == "triton" else TileConfig
    if not isinstance(tiles, want):
        raise ValueError(
            f"the {backend!r} kernels take a {want.__name__}, got {type(tiles).__name__}"
        )
    return tiles


def build_expert_kernels(
    packed: dict[str, PackedMatrix],
    num_experts: int,
    backend: str = "auto",
    tiles: TileConfig | CodeConfig | None = None,
    target: ExpertKernels | None = None,
) -> ExpertKernels:
    """The three projections in ``backend``'s layout, from their stored packed matrices (numpy, at
    load time).

    ``tiles``: a `TileConfig` (``"mosaic_tpu"``) or a `CodeConfig` (``"triton"``); default: the
    backend's. ``target``: an abstract kernel layout (`expert_kernel_shapes`, merged over layers by
    `shared_shapes.plan_groups`) to pad to, so that layers share compiled kernels.
    """
    backend = resolve_backend(backend)
    tiles = _tiles_for(backend, tiles)
    if backend in ("xla", "reference"):
        kern = ExpertKernels(
            *(PackedFactors(packed[p], num_experts) for p in ("gate", "up", "down"))
        )
        _check_projections(*kern.parts(), backend)
        return kern
    if backend == "triton":
        gate, up, down = (
            code_tiles_from_packed(packed[p], num_experts, tiles.tile)
            for p in ("gate", "up", "down")
        )
    else:
        gate = plane_tiles_from_packed(packed["gate"], num_experts, "rows", tiles)
        up = plane_tiles_from_packed(packed["up"], num_experts, "rows", tiles)
        down = plane_tiles_from_packed(packed["down"], num_experts, "lanes", tiles)
    _check_projections(gate, up, down, backend)
    kern = ExpertKernels(gate, up, down)
    if target is not None:
        kern = ExpertKernels(
            *(
                shared_shapes.pad_layout(p, t)
                for p, t in zip(kern.parts(), target.parts(), strict=True)
            )
        )
    return kern


def expert_kernel_shapes(
    packed: dict[str, PackedMatrix],
    num_experts: int,
    backend: str,
    tiles: TileConfig | CodeConfig | None = None,
) -> ExpertKernels:
    """The shapes and statics `build_expert_kernels` gives a kernel backend (arrays as
    `jax.ShapeDtypeStruct`), from the bit-widths alone: nothing is decoded or packed, so planning
    shared shapes over a model is cheap."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel shapes are planned for {KERNEL_BACKENDS}, not {backend!r}")
    tiles = _tiles_for(backend, tiles)
    parts = []
    for p, orientation in (("gate", "rows"), ("up", "rows"), ("down", "lanes")):
        pm = packed[p]
        if pm.num_units % num_experts:
            raise ValueError(
                f"PackedMatrix {p!r} has {pm.num_units} units, not a multiple of "
                f"num_experts={num_experts}"
            )
        bits = pm.bits_per_unit().reshape(num_experts, -1)
        if backend == "triton":
            lay = synthetic_code_tiles(
                bits, int(pm.n), int(pm.group_size), tiles.tile, abstract=True
            )
        else:
            lay = synthetic_plane_tiles(
                bits, int(pm.n), orientation, tiles, int(pm.group_size), abstract=True
            )
        parts.append(lay)
    _check_projections(*parts, backend)
    return shared_shapes.abstract(ExpertKernels(*parts))


def _check_projections(gate, up, down, backend: str) -> None:
    if gate.n != up.n:
        raise ValueError(f"gate and up factors have different unit lengths ({gate.n} vs {up.n})")
    if down.n != gate.n:
        raise ValueError(f"down factor unit length {down.n} differs from gate/up {gate.n}")
    if backend == "triton" and not (gate.group_size == up.group_size == down.group_size):
        raise ValueError("the GPU kernels need one group size for gate, up and down")


def row_tile(m: int, num_experts: int, backend: str) -> int:
    """Rows per tile: about the rows one expert gets, as a power of two.

    TPU: 16..128 (bf16 sublane tiling). GPU: 1..`GEMV_MAX_ROWS` for the decode GEMVs (each row costs
    one FFMA per code); more rows per expert take the dequantize-then-matmul path instead.
    """
    per_expert = max(1, -(-m // max(1, min(num_experts, m))))
    tm = 1 << (per_expert - 1).bit_length()
    return max(16, min(128, tm)) if backend == "mosaic_tpu" else tm


def swiglu_experts(
    zg: jax.Array,
    zu: jax.Array,
    group_sizes: jax.Array,
    kern: ExpertKernels,
    *,
    backend: str = "auto",
    interpret: Any = None,
    tm: int | None = None,
    splits: int | None = None,
    act: GluActivation = SWIGLU,
    gate_bias: jax.Array | None = None,
    up_bias: jax.Array | None = None,
) -> jax.Array:
    """Rows sorted by expert ``zg [M, r_g]``, ``zu [M, r_u]`` (bf16 or f32) -> ``acc [M, r_d]``
    float32 (see the module docstring). ``act``, ``gate_bias``/``up_bias`` ``[E, F]``: GPT-OSS's
    clamped activation and expert biases, on the ``"reference"`` and ``"xla"`` backends.

    ``backend``: one of `BACKENDS`, or ``"auto"``: the backend ``kern`` was built for. It must match
    the layout (``"reference"`` and ``"xla"`` share theirs). Kernel backends only: ``interpret``
    defaults to True on CPU, and ``"mosaic_tpu"`` also takes a `pltpu.InterpretParams` (the TPU
    interpreter, which fills uninitialized VMEM with NaN, raises on out-of-bounds reads and runs the
    "parallel" grid axes on several simulated cores); ``tm``: rows per row tile (default: about the
    rows one expert gets; on GPU more than `triton.kernels.GEMV_MAX_ROWS` selects the
    dequantize-then-matmul path); ``splits`` (GPU decode): cut each program's reduction into this
    many chunks on an extra grid axis (atomic adds), ``None`` picks it from the grid size, 1
    disables it. ``h`` is kept in the activation dtype between the two products.
    """
    family = kern.family
    backend = family if backend == "auto" else resolve_backend(backend)
    if backend not in (("xla", "reference") if family == "xla" else (family,)):
        raise ValueError(
            f"this layout was built for the {family!r} backend, not {backend!r}: rebuild it with "
            f"build_expert_kernels(..., backend={backend!r})"
        )
    _check_inputs(zg, zu, group_sizes, kern)
    glu = (act, gate_bias, up_bias)
    if backend == "reference":
        ag, au, bd = (p.dense() for p in kern.parts())
        return swiglu_experts_reference(zg, zu, group_sizes, ag, au, bd, *glu)
    if backend == "xla":
        ag, au, bd = (p.dense().astype(zg.dtype) for p in kern.parts())
        return swiglu_experts_xla(zg, zu, group_sizes, ag, au, bd, *glu).astype(jnp.float32)
    if act != SWIGLU or gate_bias is not None or up_bias is not None:
        raise ValueError(
            f"the {backend!r} kernels compute bias-free silu(g)·u experts; GPT-OSS's biased, "
            "clamped experts run on the 'xla' (or 'reference') backend"
        )
    interpret = _interpret_mode(interpret, backend)
    tm = tm or row_tile(zg.shape[0], kern.num_experts, backend)
    return _kernel_experts(
        zg, zu, group_sizes, kern, backend=backend, interpret=interpret, tm=tm, splits=splits
    )


def _interpret_mode(interpret: Any, backend: str) -> Any:
    """``interpret`` as a bool (None: True on CPU), or the TPU interpreter's params (Mosaic family
    only)."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    if isinstance(interpret, (bool, np.bool_)):
        return bool(interpret)
    from jax.experimental.pallas import tpu as pltpu

    if backend == "mosaic_tpu" and isinstance(interpret, pltpu.InterpretParams):
        # a frozen dataclass: hashable, so it can be a static argument of the jit below
        return interpret
    alternative = " or a pltpu.InterpretParams" if backend == "mosaic_tpu" else ""
    raise TypeError(
        f"interpret must be a bool{alternative} for the {backend!r} kernels, got {interpret!r}"
    )


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "tm", "splits"))
def _kernel_experts(
    zg,
    zu,
    group_sizes,
    kern: ExpertKernels,
    *,
    backend: str,
    interpret: Any,
    tm: int,
    splits: int | None,
):
    """The body of `swiglu_experts`, jitted: layers whose layouts have one shape (`shared_shapes`)
    reuse one trace, and an enclosing jit lowers it once (one Triton/Mosaic kernel per shape)."""
    m = zg.shape[0]
    rows_e = expert_of_rows(group_sizes, m)
    if backend == "mosaic_tpu":
        acc_k, h, d_rows = mosaic_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret)
    elif tm <= triton_kernels.GEMV_MAX_ROWS:
        acc_k, h, d_rows = gemv_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret, splits)
    else:
        acc_k, h, d_rows = dequantized_experts(zg, zu, group_sizes, kern, rows_e, interpret)
    d_l = kern.down
    acc = gather_rows(acc_k, jnp.asarray(d_l.comp_pos)[rows_e])
    if d_l.has_dense16:
        w16 = jnp.swapaxes(jnp.asarray(d_l.dense16), 1, 2).astype(jnp.float32)  # [E, Fp, n16]
        a16 = grouped_matmul(d_rows(h).astype(jnp.float32), w16, group_sizes)
        cols = jnp.asarray(d_l.comp16)[rows_e]
        acc = acc.at[jnp.arange(m)[:, None], cols].add(a16.astype(jnp.float32), mode="drop")
    return acc


def _check_inputs(
    zg: jax.Array, zu: jax.Array, group_sizes: jax.Array, kern: ExpertKernels
) -> None:
    """One clear error per mismatch between the activations and the layouts (shapes are static)."""
    for name, z, pt in (("zg", zg, kern.gate), ("zu", zu, kern.up)):
        if z.ndim != 2 or z.shape[1] != pt.r:
            raise ValueError(
                f"swiglu_experts: {name} must be [M, {pt.r}] for this layout, got {tuple(z.shape)}"
            )
    if zu.shape[0] != zg.shape[0]:
        raise ValueError(
            f"swiglu_experts: zg and zu have different row counts ({zg.shape[0]} vs {zu.shape[0]})"
        )
    if group_sizes.shape != (kern.num_experts,):
        raise ValueError(
            f"swiglu_experts: group_sizes must be [{kern.num_experts}], got "
            f"{tuple(group_sizes.shape)}"
        )
    if zg.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"swiglu_experts: activations must be float32 or bfloat16, got {zg.dtype}")
