"""The quantized routed-expert product behind one switch: ``implementation = "pallas" | "xla" |
None``.

`ExpertKernels` holds the three projections in a kernel layout derived once at load time from the
stored `PackedMatrix` format: bit-planes (`layout.PlaneTiles`) for the TPU family, integer codes
(`code_layout.CodeTiles`) for the GPU family (see `code_layout` for why the two differ).

GPU (``"triton"``): at decode (≤ `triton_codes.GEMV_MAX_ROWS` rows per expert) the decode GEMVs of
`triton_codes` (gate/up, then down); with more rows per expert (prefill) the kernels dequantize each
expert's factors once and XLA's grouped matmul does the compute-bound product.

TPU (``"mosaic"``): `swiglu_experts` runs the two kernels —
gate/up fused with the SiLU gating (one pass over the rows, ``h`` written once in the activation
dtype) and down — on rows sorted by expert, and maps the kernel's component order back:

    z (rows sorted by expert, original component order)
      └ gather per row into the expert's kernel order (``kernel_comp``; a cheap ``M·r`` gather)
    h    = gate_up kernel                       [Mp, Fp]
    acc  = down kernel                          [Mp, L·tile]   (kernel component order)
      └ gather back to original order (``comp_pos``; 0-/16-bit components read a zero column)
    16-bit components (rare) go through a dense XLA side product, added before the gating / after.

Backends: ``"triton"`` (GPU: grid of independent programs, in-kernel loops), ``"mosaic"`` (TPU:
scalar-prefetch grid with the reduction over grid steps), each also runnable in interpret mode.
Both families map the kernel component order back the same way (``kernel_comp`` / ``comp_pos``).
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
from pallas_kernels import shared_shapes, tpu_gmm, triton_codes
from pallas_kernels.code_layout import (
    CodeConfig,
    CodeTiles,
    code_tiles_from_packed,
    synthetic_code_tiles,
)
from pallas_kernels.layout import (
    PlaneTiles,
    TileConfig,
    plane_tiles_from_packed,
    synthetic_plane_tiles,
)
from pallas_kernels.routing import expert_of_rows, make_row_tiles

IMPLEMENTATIONS = ("pallas", "xla", None)
BACKENDS = ("triton", "mosaic")

# Tile sizes per backend: TPU needs 8 word rows (tile_rows = 256) and 128-lane blocks; on GPU
# smaller tiles promote fewer boundary components (see layout) and give more programs at decode.
DEFAULT_TILES = {
    "mosaic": TileConfig(
        tile_rows=256, tile_lanes=128, n_block=2048, f_block=2048, n_block_min=128, f_block_min=256
    ),
    "triton": CodeConfig(tile=128),
}


@dataclasses.dataclass(frozen=True)
class ExpertKernels:
    """The three projections in kernel layout (a pytree): `PlaneTiles` (gate and up in ``"rows"``,
    down in ``"lanes"`` orientation) for the TPU family, `CodeTiles` for the GPU family."""

    gate: PlaneTiles | CodeTiles
    up: PlaneTiles | CodeTiles
    down: PlaneTiles | CodeTiles

    @property
    def family(self) -> str:
        return "triton" if isinstance(self.down, CodeTiles) else "mosaic"

    def parts(self) -> tuple:
        """``(gate, up, down)``: the per-projection tuple `shared_shapes.plan_groups` takes."""
        return (self.gate, self.up, self.down)

    def bytes_read(self) -> int:
        return sum(sum(p.bytes_read().values()) for p in self.parts())


jax.tree_util.register_dataclass(ExpertKernels, data_fields=["gate", "up", "down"], meta_fields=[])


# Platforms on which the compiled kernels have passed `bench/kernels.py`'s correctness check on real
# hardware. Until then `implementation=None` keeps the XLA path there: the kernels lower for GPU and
# TPU (tested with jax.export) and match the reference in interpret mode, but a default must not be
# a kernel nobody has run. A session with the device adds its platform after the bench passes.
VERIFIED_PLATFORMS: frozenset[str] = frozenset()


def resolve_implementation(implementation: str | None, platform: str | None = None) -> str:
    """``None`` -> ``"pallas"`` on GPU/TPU once verified there (`VERIFIED_PLATFORMS`), else
    ``"xla"``
    (always on CPU: interpret mode is for tests, not speed)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation is not None:
        return implementation
    platform = platform or jax.default_backend()
    kind = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    return "pallas" if kind in ("gpu", "tpu") and kind in VERIFIED_PLATFORMS else "xla"


def default_backend(platform: str | None = None) -> str:
    """Kernel family for a platform: Mosaic on TPU, Triton elsewhere (GPU; interpret mode on
    CPU)."""
    return "mosaic" if (platform or jax.default_backend()) == "tpu" else "triton"


def _family(
    cfg: TileConfig | CodeConfig | None, backend: str | None
) -> tuple[str, TileConfig | CodeConfig]:
    """(backend, cfg) with the defaults filled in; ``cfg``'s type picks the family when ``backend``
    is None."""
    if backend is None:
        backend = {TileConfig: "mosaic", CodeConfig: "triton"}.get(type(cfg)) or default_backend()
    cfg = cfg or DEFAULT_TILES[backend]
    want = CodeConfig if backend == "triton" else TileConfig
    if not isinstance(cfg, want):
        raise ValueError(
            f"the {backend!r} kernels take a {want.__name__}, got {type(cfg).__name__}"
        )
    return backend, cfg


def build_expert_kernels(
    packed: dict[str, PackedMatrix],
    num_experts: int,
    cfg: TileConfig | CodeConfig | None = None,
    backend: str | None = None,
    target: ExpertKernels | None = None,
) -> ExpertKernels:
    """Kernel layouts of the three projections from their stored packed matrices (numpy, at load
    time).

    ``cfg``: a `TileConfig` (TPU family, bit-planes) or a `CodeConfig` (GPU family, integer codes);
    its type picks the family when ``backend`` is None, else the platform's default family does.
    ``target``: an abstract layout (`expert_kernel_shapes`, merged over layers by
    `shared_shapes.plan_groups`) to pad to, so that layers share compiled kernels.
    """
    backend, cfg = _family(cfg, backend)
    if backend == "triton":
        gate, up, down = (
            code_tiles_from_packed(packed[p], num_experts, cfg.tile) for p in ("gate", "up", "down")
        )
    else:
        gate = plane_tiles_from_packed(packed["gate"], num_experts, "rows", cfg)
        up = plane_tiles_from_packed(packed["up"], num_experts, "rows", cfg)
        down = plane_tiles_from_packed(packed["down"], num_experts, "lanes", cfg)
    _check_projections(gate, up, down, backend)
    kern = ExpertKernels(gate, up, down)
    if target is not None:
        kern = ExpertKernels(
            *(
                shared_shapes.pad_layout(p, t)
                for p, t in zip(kern.parts(), target.parts(), strict=False)
            )
        )
    return kern


def expert_kernel_shapes(
    packed: dict[str, PackedMatrix],
    num_experts: int,
    cfg: TileConfig | CodeConfig | None = None,
    backend: str | None = None,
) -> ExpertKernels:
    """The shapes and statics `build_expert_kernels` gives (arrays as `jax.ShapeDtypeStruct`), from
    the
    bit-widths alone: nothing is decoded or packed, so planning shared shapes over a model is
    cheap."""
    backend, cfg = _family(cfg, backend)
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
            lay = synthetic_code_tiles(bits, int(pm.n), int(pm.group_size), cfg.tile, abstract=True)
        else:
            lay = synthetic_plane_tiles(
                bits, int(pm.n), orientation, cfg, int(pm.group_size), abstract=True
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
    return max(16, min(128, tm)) if backend == "mosaic" else tm


def reduction_splits(programs: int, steps: int, target: int = 1024, min_steps: int = 4) -> int:
    """Chunks to cut a per-program reduction of ``steps`` items into (Triton), so that about
    ``target`` programs run (a few per SM on current GPUs) while each keeps ≥ ``min_steps``
    items."""
    return max(1, min(steps // min_steps, target // max(programs, 1)))


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``out[m, j] = x[m, index[m, j]]`` with ``index == x.shape[1]`` reading zero."""
    xp = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    return jnp.take_along_axis(xp, index, axis=1)


def _step_tables(pt: PlaneTiles) -> tuple[jax.Array, ...]:
    def flat(a):
        return jnp.asarray(a).reshape(-1)

    return (
        flat(pt.step_q),
        flat(pt.step_tile),
        flat(pt.step_local),
        flat(pt.step_plane),
        jnp.asarray(pt.expert_nsteps),
    )


def swiglu_experts(
    zg: jax.Array,
    zu: jax.Array,
    group_sizes: jax.Array,
    kern: ExpertKernels,
    *,
    backend: str | None = None,
    interpret: Any = None,
    tm: int | None = None,
    splits: int | None = None,
) -> jax.Array:
    """Rows sorted by expert ``zg [M, r_g]``, ``zu [M, r_u]`` (bf16 or f32) -> ``acc [M, r_d]``
    float32.

    Same result as `reference.swiglu_experts_reference` on the dequantized factors. ``interpret``
    defaults to True on CPU; the Mosaic family also takes a `pltpu.InterpretParams` (the TPU
    interpreter, which fills uninitialized VMEM with NaN, raises on out-of-bounds reads and runs the
    "parallel" grid axes on several simulated cores). ``h`` is kept in the activation dtype between
    the two products. ``backend`` must match the layout's family (default: the layout's). ``tm``:
    rows per row tile (default: about the rows one expert gets; on GPU more than
    `triton_codes.GEMV_MAX_ROWS` selects the dequantize-then-matmul path). ``splits`` (GPU decode):
    cut each program's reduction into this many chunks on an extra grid axis (atomic adds); ``None``
    picks it from the grid size, 1 disables it.
    """
    family = kern.family
    backend = backend or family
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != family:
        raise ValueError(
            f"this layout was built for the {family!r} kernels, not {backend!r}: rebuild it with "
            f"backend={backend!r}"
        )
    interpret = _interpret_mode(interpret, backend)
    _check_inputs(zg, zu, group_sizes, kern)
    tm = tm or row_tile(zg.shape[0], kern.gate.num_experts, backend)
    return _swiglu_experts(
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

    if backend == "mosaic" and isinstance(interpret, pltpu.InterpretParams):
        # a frozen dataclass: hashable, so it can be a static argument of the jit below
        return interpret
    raise TypeError(
        f"interpret must be a bool{' or a pltpu.InterpretParams' if backend == 'mosaic' else ''} "
        f"for the {backend!r} kernels, got {interpret!r}"
    )


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "tm", "splits"))
def _swiglu_experts(
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
    if backend == "mosaic":
        acc_k, h, d_rows = _mosaic_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret)
    elif tm <= triton_codes.GEMV_MAX_ROWS:
        acc_k, h, d_rows = _gemv_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret, splits)
    else:
        acc_k, h, d_rows = _dequantized_experts(zg, zu, group_sizes, kern, rows_e, interpret)
    d_l = kern.down
    acc = _gather_rows(acc_k, jnp.asarray(d_l.comp_pos)[rows_e])
    if d_l.has_dense16:
        w16 = jnp.swapaxes(jnp.asarray(d_l.dense16), 1, 2).astype(jnp.float32)  # [E, Fp, n16]
        a16 = grouped_matmul(d_rows(h).astype(jnp.float32), w16, group_sizes)
        cols = jnp.asarray(d_l.comp16)[rows_e]
        acc = acc.at[jnp.arange(m)[:, None], cols].add(a16.astype(jnp.float32), mode="drop")
    return acc


def _dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes):
    """Contributions of the 16-bit units of gate and up (``[M, Fp]`` float32 each), or ``(None,
    None)``."""
    if not (g_l.has_dense16 or u_l.has_dense16):
        return None, None
    return tuple(_dense16_rows(z, pt, rows_e, group_sizes) for z, pt in ((zg, g_l), (zu, u_l)))


def _mosaic_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret):
    """TPU family: bit-plane kernels with scalar prefetch. -> (acc in kernel order [M, ·], h, rows
    of h)."""
    g_l, u_l, d_l = kern.parts()
    m, dt = zg.shape[0], zg.dtype
    rt = make_row_tiles(group_sizes, m, tm)
    to_tiles = _to_tiles(rt, tm)
    zk_g = to_tiles(_gather_rows(zg, jnp.asarray(g_l.kernel_comp)[rows_e]))
    zk_u = to_tiles(_gather_rows(zu.astype(dt), jnp.asarray(u_l.kernel_comp)[rows_e]))
    init_g, init_u = (
        None if x is None else to_tiles(x)
        for x in _dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes)
    )
    gu_args = (
        rt,
        _step_tables(g_l),
        _step_tables(u_l),
        zk_g,
        zk_u,
        g_l.words,
        u_l.words,
        g_l.scales,
        u_l.scales,
        init_g,
        init_u,
    )
    h = tpu_gmm.gate_up(
        *gu_args,
        tile=g_l.tile,
        n_block=g_l.block,
        group_size=g_l.group_size,
        n_valid=g_l.n,
        out_dtype=dt,
        tm=tm,
        interpret=interpret,
    )
    tables = _step_tables(d_l)
    tables = tables[:4] + (jnp.asarray(d_l.step_fblock).reshape(-1),) + tables[4:]
    acc_k = tpu_gmm.down(
        rt,
        tables,
        jnp.asarray(d_l.tile_bits),
        d_l.max_tiles,
        h,
        d_l.words,
        d_l.scales,
        tile=d_l.tile,
        f_block=d_l.block,
        group_size=d_l.group_size,
        tm=tm,
        interpret=interpret,
    )
    return acc_k[rt.dest], h, lambda hh: hh[rt.dest]


def _gemv_experts(zg, zu, group_sizes, kern, rows_e, tm, interpret, splits):
    """GPU decode: the code-layout GEMVs. -> (acc in kernel order [M, L·C], h [Mp, Fp], rows of
    h)."""
    g_l, u_l, d_l = kern.parts()
    m, dt = zg.shape[0], zg.dtype
    gs, c = g_l.group_size, g_l.tile
    gp = g_l.n_padded // gs
    rt = make_row_tiles(group_sizes, m, tm)
    to_tiles = _to_tiles(rt, tm)
    t = rt.expert.shape[0]
    exps = triton_codes.exponent_table()

    def flat(a):
        return jnp.asarray(a).reshape(-1)

    def quad(a):
        return jnp.asarray(a).reshape(*a.shape[:-1], a.shape[-1] // 4, 4)  # a thread's 4 columns

    z = [
        quad(to_tiles(_gather_rows(zz.astype(jnp.float32), jnp.asarray(pt.kernel_comp)[rows_e])))
        for zz, pt in ((zg, g_l), (zu, u_l))
    ]
    tabs = [
        (flat(pt.expert_tiles), flat(pt.width_start), jnp.asarray(pt.tile_row0))
        for pt in (g_l, u_l)
    ]
    gu_splits = splits or reduction_splits(gp * t, max(g_l.max_tiles, u_l.max_tiles), min_steps=2)
    g, u = triton_codes.gate_up_gemv(
        rt,
        *tabs,
        *z,
        quad(g_l.words),
        quad(u_l.words),
        quad(g_l.scales),
        quad(u_l.scales),
        exps,
        tm=tm,
        tile=c,
        group_size=gs,
        widths=(g_l.widths, u_l.widths),
        max_tiles=(g_l.max_tiles, u_l.max_tiles),
        interpret=interpret,
        splits=gu_splits,
    )
    fp = g_l.n_padded
    inits = [
        None if x is None else to_tiles(x)
        for x in _dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes)
    ]
    h = _gated(g[:, :fp], u[:, :fp], inits, g_l, dt)
    hsum = h.astype(jnp.float32).reshape(h.shape[0], gp, gs).sum(axis=2)
    hp = jnp.pad(h.astype(jnp.float32), ((0, 0), (0, triton_codes.overrun(d_l.widths, gs))))
    hp = hp.reshape(t, tm, hp.shape[1]).transpose(0, 2, 1)  # [T, Fp + overrun, tm]
    d_splits = splits or reduction_splits(d_l.max_tiles * t, gp)
    acc_k = triton_codes.down_gemv(
        rt,
        flat(d_l.expert_tiles),
        jnp.asarray(d_l.expert_ntiles),
        jnp.asarray(d_l.tile_bits),
        jnp.asarray(d_l.tile_row0),
        hp,
        hsum,
        d_l.words,
        d_l.scales,
        exps,
        tm=tm,
        tile=d_l.tile,
        group_size=gs,
        widths=d_l.widths,
        interpret=interpret,
        splits=d_splits,
    )
    return acc_k[rt.dest], h, lambda hh: hh[rt.dest]


def _dequantized_experts(zg, zu, group_sizes, kern, rows_e, interpret):
    """GPU prefill: each expert's factors dequantized by the kernels, then XLA's grouped matmul."""
    g_l, u_l, d_l = kern.parts()
    dt = zg.dtype
    exps = triton_codes.exponent_table()

    def deq(pt, tr):
        return triton_codes.dequantize_tiles(pt, exps, dtype=dt, transpose=tr, interpret=interpret)

    g = _grouped_f32(
        _gather_rows(zg, jnp.asarray(g_l.kernel_comp)[rows_e]), deq(g_l, True), group_sizes
    )
    u = _grouped_f32(
        _gather_rows(zu.astype(dt), jnp.asarray(u_l.kernel_comp)[rows_e]),
        deq(u_l, True),
        group_sizes,
    )
    h = _gated(g, u, _dense16_inits(zg, zu, g_l, u_l, rows_e, group_sizes), g_l, dt)
    return _grouped_f32(h, deq(d_l, False), group_sizes), h, lambda hh: hh


def _gated(g: jax.Array, u: jax.Array, inits, pt: CodeTiles, dtype) -> jax.Array:
    """``h = silu(g)·u`` in ``dtype``, zero past ``F``, after adding the 16-bit units' contributions
    ``inits = (to g, to u)`` (or ``(None, None)``)."""
    if inits[0] is not None:
        g, u = g + inits[0], u + inits[1]
    return jnp.where(jnp.arange(pt.n_padded) < pt.n, jax.nn.silu(g) * u, 0.0).astype(dtype)


def _grouped_f32(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul accumulating in float32 (``ragged_dot`` on GPU/TPU, the tiled loop on CPU)."""
    if jax.default_backend() == "cpu":
        return grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), group_sizes)
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)


def _to_tiles(rt, tm: int):
    mp = rt.expert.shape[0] * tm

    def to_tiles(x: jax.Array) -> jax.Array:  # sorted rows -> padded row-tile order
        return jnp.zeros((mp, x.shape[1]), x.dtype).at[rt.dest].set(x)

    return to_tiles


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
    if group_sizes.shape != (kern.gate.num_experts,):
        raise ValueError(
            f"swiglu_experts: group_sizes must be [{kern.gate.num_experts}], got "
            f"{tuple(group_sizes.shape)}"
        )
    if zg.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"swiglu_experts: activations must be float32 or bfloat16, got {zg.dtype}")


def _dense16_rows(
    z: jax.Array, pt: PlaneTiles | CodeTiles, rows_e: jax.Array, group_sizes: jax.Array
) -> jax.Array:
    """Contribution of a projection's 16-bit components, ``[M, Fp]`` float32 (zeros if it has
    none)."""
    if not pt.has_dense16:
        return jnp.zeros((z.shape[0], pt.n_padded), jnp.float32)
    z16 = _gather_rows(z.astype(jnp.float32), jnp.asarray(pt.comp16)[rows_e])
    return grouped_matmul(z16, jnp.asarray(pt.dense16).astype(jnp.float32), group_sizes).astype(
        jnp.float32
    )


__all__ = [
    "IMPLEMENTATIONS",
    "ExpertKernels",
    "build_expert_kernels",
    "expert_kernel_shapes",
    "swiglu_experts",
    "resolve_implementation",
]
