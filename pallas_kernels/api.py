"""The quantized routed-expert product behind one switch: ``implementation = "pallas" | "xla" | None``.

`ExpertKernels` holds the three projections in kernel layout (`layout.PlaneTiles`), derived once at
load time from the stored `PackedMatrix` format. `swiglu_experts` runs the two kernels —
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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bitsmoe_jax.models.grouped_matmul import grouped_matmul
from bitsmoe_jax.quant.packing import PackedMatrix
from pallas_kernels import tpu_gmm, triton_gmm
from pallas_kernels.layout import PlaneTiles, TileConfig, plane_tiles_from_packed
from pallas_kernels.routing import expert_of_rows, make_row_tiles

IMPLEMENTATIONS = ("pallas", "xla", None)
BACKENDS = ("triton", "mosaic")

# Tile sizes per backend: TPU needs 8 word rows (tile_rows = 256) and 128-lane blocks; on GPU smaller
# tiles promote fewer boundary components (see layout) and give more programs at decode.
DEFAULT_TILES = {
    "mosaic": TileConfig(tile_rows=256, tile_lanes=128, n_block=2048, f_block=2048, n_block_min=128, f_block_min=256),
    "triton": TileConfig(tile_rows=128, tile_lanes=64, n_block=128, f_block=256, n_block_min=128, f_block_min=256),
}


@dataclasses.dataclass(frozen=True)
class ExpertKernels:
    """Gate and up in ``"rows"`` layout, down in ``"lanes"`` layout (a pytree)."""

    gate: PlaneTiles
    up: PlaneTiles
    down: PlaneTiles

    def bytes_read(self) -> int:
        return sum(sum(p.bytes_read().values()) for p in (self.gate, self.up, self.down))


jax.tree_util.register_dataclass(ExpertKernels, data_fields=["gate", "up", "down"], meta_fields=[])


# Platforms on which the compiled kernels have passed `bench/kernels.py`'s correctness check on real
# hardware. Until then `implementation=None` keeps the XLA path there: the kernels lower for GPU and
# TPU (tested with jax.export) and match the reference in interpret mode, but a default must not be a
# kernel nobody has run. A session with the device adds its platform after the bench passes.
VERIFIED_PLATFORMS: frozenset[str] = frozenset()


def resolve_implementation(implementation: str | None, platform: str | None = None) -> str:
    """``None`` -> ``"pallas"`` on GPU/TPU once verified there (`VERIFIED_PLATFORMS`), else ``"xla"``
    (always on CPU: interpret mode is for tests, not speed)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation is not None:
        return implementation
    platform = platform or jax.default_backend()
    kind = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    return "pallas" if kind in ("gpu", "tpu") and kind in VERIFIED_PLATFORMS else "xla"


def default_backend(platform: str | None = None) -> str:
    """Kernel family for a platform: Mosaic on TPU, Triton elsewhere (GPU; interpret mode on CPU)."""
    return "mosaic" if (platform or jax.default_backend()) == "tpu" else "triton"


def build_expert_kernels(
    packed: dict[str, PackedMatrix], num_experts: int, cfg: TileConfig | None = None, backend: str | None = None
) -> ExpertKernels:
    """Kernel layouts of the three projections from their stored packed matrices (numpy, at load time)."""
    cfg = cfg or DEFAULT_TILES[backend or default_backend()]
    gate = plane_tiles_from_packed(packed["gate"], num_experts, "rows", cfg)
    up = plane_tiles_from_packed(packed["up"], num_experts, "rows", cfg)
    if gate.n != up.n:
        raise ValueError(f"gate and up factors have different unit lengths ({gate.n} vs {up.n})")
    down = plane_tiles_from_packed(packed["down"], num_experts, "lanes", cfg)
    if down.n != gate.n:
        raise ValueError(f"down factor unit length {down.n} differs from gate/up {gate.n}")
    return ExpertKernels(gate, up, down)


def row_tile(m: int, num_experts: int, backend: str) -> int:
    """Rows per tile: about the rows one expert gets, as a power of two.

    TPU: 16..128 (bf16 sublane tiling). GPU: 16..64 — also at decode, where the rows past the
    expert's are zero padding: the tensor-core dot (Triton needs 16 rows) takes the multiply-adds
    off the ALUs, which the bit-plane unpack already keeps busy. A smaller explicit ``tm`` (1, 2)
    takes the broadcast-reduce GEMV form instead (kept selectable for benchmarking).
    """
    per_expert = max(1, -(-m // max(1, min(num_experts, m))))
    tm = 1 << (per_expert - 1).bit_length()
    return max(16, min(128 if backend == "mosaic" else 64, tm))


def reduction_splits(programs: int, steps: int, target: int = 1024, min_steps: int = 4) -> int:
    """Chunks to cut a per-program reduction of ``steps`` items into (Triton), so that about
    ``target`` programs run (a few per SM on current GPUs) while each keeps ≥ ``min_steps`` items."""
    return max(1, min(steps // min_steps, target // max(programs, 1)))


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """``out[m, j] = x[m, index[m, j]]`` with ``index == x.shape[1]`` reading zero."""
    xp = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
    return jnp.take_along_axis(xp, index, axis=1)


def _step_tables(pt: PlaneTiles) -> tuple[jax.Array, ...]:
    flat = lambda a: jnp.asarray(a).reshape(-1)
    return (flat(pt.step_q), flat(pt.step_tile), flat(pt.step_local), flat(pt.step_plane), jnp.asarray(pt.expert_nsteps))


def swiglu_experts(
    zg: jax.Array, zu: jax.Array, group_sizes: jax.Array, kern: ExpertKernels, *,
    backend: str | None = None, interpret: bool | None = None, tm: int | None = None, splits: int | None = None,
) -> jax.Array:
    """Rows sorted by expert ``zg [M, r_g]``, ``zu [M, r_u]`` (bf16 or f32) -> ``acc [M, r_d]`` float32.

    Same result as `reference.swiglu_experts_reference` on the dequantized factors. ``interpret``
    defaults to True on CPU. ``h`` is kept in the activation dtype between the two kernels.
    ``splits`` (Triton only): cut each program's reduction into this many chunks on an extra grid
    axis (atomic adds; see `triton_gmm`); ``None`` picks it from the grid size, 1 disables it.
    """
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    g_l, u_l, d_l = kern.gate, kern.up, kern.down
    _check_inputs(zg, zu, group_sizes, kern)
    m = zg.shape[0]
    dt = zg.dtype
    e = g_l.num_experts
    tm = tm or row_tile(m, e, backend)
    rt = make_row_tiles(group_sizes, m, tm)
    mp = rt.expert.shape[0] * tm
    rows_e = expert_of_rows(group_sizes, m)

    def to_tiles(x: jax.Array) -> jax.Array:  # sorted rows -> padded row-tile order
        return jnp.zeros((mp, x.shape[1]), x.dtype).at[rt.dest].set(x)

    zk_g = to_tiles(_gather_rows(zg, jnp.asarray(g_l.kernel_comp)[rows_e]))
    zk_u = to_tiles(_gather_rows(zu.astype(dt), jnp.asarray(u_l.kernel_comp)[rows_e]))
    init_g = init_u = None
    if g_l.has_dense16 or u_l.has_dense16:
        init_g, init_u = (to_tiles(_dense16_rows(z, pt, rows_e, group_sizes)) for z, pt in ((zg, g_l), (zu, u_l)))
    common = dict(tm=tm, interpret=interpret)
    gu_args = (rt, _step_tables(g_l), _step_tables(u_l), zk_g, zk_u, g_l.words, u_l.words, g_l.scales, u_l.scales, init_g, init_u)
    gu_geometry = dict(tile=g_l.tile, n_block=g_l.block, group_size=g_l.group_size, n_valid=g_l.n, out_dtype=dt, **common)
    geometry = dict(tile=d_l.tile, f_block=d_l.block, group_size=d_l.group_size, **common)
    t = rt.expert.shape[0]
    if backend == "triton":
        gu_splits = splits or reduction_splits((g_l.n_padded // g_l.block) * t, max(g_l.max_steps, u_l.max_steps))
        h = triton_gmm.gate_up(*gu_args, splits=gu_splits, **gu_geometry)
        d_splits = splits or reduction_splits(d_l.max_tiles * t, d_l.n_padded // d_l.block)
        acc_k = triton_gmm.down(
            rt, jnp.asarray(d_l.expert_tiles), jnp.asarray(d_l.expert_ntiles), jnp.asarray(d_l.tile_q0),
            jnp.asarray(d_l.tile_bits), h, d_l.words, d_l.scales, splits=d_splits, **geometry,
        )
    else:
        h = tpu_gmm.gate_up(*gu_args, **gu_geometry)
        tables = _step_tables(d_l)
        tables = tables[:4] + (jnp.asarray(d_l.step_fblock).reshape(-1),) + tables[4:]
        acc_k = tpu_gmm.down(rt, tables, jnp.asarray(d_l.tile_bits), d_l.max_tiles, h, d_l.words, d_l.scales, **geometry)
    acc = _gather_rows(acc_k[rt.dest], jnp.asarray(d_l.comp_pos)[rows_e])
    if d_l.has_dense16:
        w16 = jnp.swapaxes(jnp.asarray(d_l.dense16), 1, 2).astype(jnp.float32)  # [E, Fp, n16]
        a16 = grouped_matmul(h[rt.dest].astype(jnp.float32), w16, group_sizes)
        cols = jnp.asarray(d_l.comp16)[rows_e]
        acc = acc.at[jnp.arange(m)[:, None], cols].add(a16.astype(jnp.float32), mode="drop")
    return acc


def _check_inputs(zg: jax.Array, zu: jax.Array, group_sizes: jax.Array, kern: ExpertKernels) -> None:
    """One clear error per mismatch between the activations and the layouts (shapes are static)."""
    for name, z, pt in (("zg", zg, kern.gate), ("zu", zu, kern.up)):
        if z.ndim != 2 or z.shape[1] != pt.r:
            raise ValueError(f"swiglu_experts: {name} must be [M, {pt.r}] for this layout, got {tuple(z.shape)}")
    if zu.shape[0] != zg.shape[0]:
        raise ValueError(f"swiglu_experts: zg and zu have different row counts ({zg.shape[0]} vs {zu.shape[0]})")
    if group_sizes.shape != (kern.gate.num_experts,):
        raise ValueError(f"swiglu_experts: group_sizes must be [{kern.gate.num_experts}], got {tuple(group_sizes.shape)}")
    if zg.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"swiglu_experts: activations must be float32 or bfloat16, got {zg.dtype}")


def _dense16_rows(z: jax.Array, pt: PlaneTiles, rows_e: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Contribution of a projection's 16-bit components, ``[M, Fp]`` float32 (zeros if it has none)."""
    if not pt.has_dense16:
        return jnp.zeros((z.shape[0], pt.n_padded), jnp.float32)
    z16 = _gather_rows(z.astype(jnp.float32), jnp.asarray(pt.comp16)[rows_e])
    return grouped_matmul(z16, jnp.asarray(pt.dense16).astype(jnp.float32), group_sizes).astype(jnp.float32)


__all__ = ["IMPLEMENTATIONS", "ExpertKernels", "build_expert_kernels", "swiglu_experts", "resolve_implementation"]
