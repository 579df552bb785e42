"""The quantized routed-expert block: shared bases + packed expert factors, served from packed
words.

Drop-in for `models.moe.Experts` (same call: (x [N, D], plan) -> float32 [N, D]). Dataflow per
token:

    zg = Ṽgᵀx, zu = Ṽuᵀx dense, once per token, before routing g = zg·Ag[e], u = zu·Au[e] grouped
    over the routed experts (factors [E, r, F]) h = silu(g) ⊙ u acc = Σ_e w_e · h·Bd[e]ᵀ grouped,
    accumulated in rank space (r_d) y = Ũ·acc dense, once per token

Bases are held as stored (int8 codes + bf16 row scales, or bf16) and the factors as packed
bit-plane words (`packing.PackedMatrix`, one per projection holding all E·r units of the layer).

The routed part is `pallas_kernels.api.swiglu_experts`, one op whose backend is chosen by `backend`:

* ``"xla"``: dequantize the factors inside the jitted forward and run `grouped_matmul` — plain jnp,
  every platform.
* ``"triton"`` (GPU) / ``"mosaic_tpu"`` (TPU): the Pallas grouped kernels read packed words and
  unpack them in registers (interpret mode on CPU). They read a kernel layout derived from the
  stored format by `set_backend` (numpy, once, at load time); the stored arrays, the checkpoint
  format and `stored_bits` are unchanged.
* ``"reference"``: the op's per-row float32 reference, for debugging.
* ``"auto"`` (default): the platform's kernel backend where it is verified and its layout has been
  built, else ``"xla"``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitsmoe_jax.method import decompose as basis_lib
from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.expert_scale_tuning import ScaleTuning, TuningStats
from bitsmoe_jax.method.layer_problem import LayerProblem
from bitsmoe_jax.method.packing import PackedMatrix, merge_shards
from bitsmoe_jax.method.sharded import ExpertLayout
from bitsmoe_jax.method.streamed import round_and_pack
from bitsmoe_jax.models.moe import (
    PLAIN,
    SWIGLU,
    ExpertFn,
    GluActivation,
    RoutingPlan,
    combine,
    down_bias_term,
)
from pallas_kernels import api as kernels_api
from pallas_kernels import shared_shapes

_log = logging.getLogger(__name__)


class Packed(nnx.Variable):
    """Stored (quantized) arrays: not trainable parameters, counted in the effective bits."""


class KernelLayout(nnx.Variable):
    """Derived arrays the Pallas kernels read (`pallas_kernels.api.ExpertKernels`): rebuilt from the
    `Packed` arrays at load time, never saved, not counted in the effective bits."""


@dataclasses.dataclass(frozen=True)
class FactorMeta:
    """Static (hashable) layout of one projection's PackedMatrix: part of the jit cache key."""

    n: int
    group_size: int
    seg_bits: tuple[int, ...]
    seg_sizes: tuple[int, ...]

    @classmethod
    def of(cls, pm: PackedMatrix) -> FactorMeta:
        return cls(
            int(pm.n),
            int(pm.group_size),
            tuple(int(b) for b in pm.seg_bits),
            tuple(int(s) for s in pm.seg_sizes),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "group_size": self.group_size,
            "seg_bits": list(self.seg_bits),
            "seg_sizes": list(self.seg_sizes),
        }


class QuantizedExperts(nnx.Module):
    """E experts as shared bases ([D, r] per projection) and packed factors ([E, r, F] per
    projection)."""

    def __init__(
        self,
        num_experts: int,
        bases: dict[str, dict[str, np.ndarray]],
        packed: dict[str, PackedMatrix],
        backend: str = "auto",
    ):
        kernels_api.resolve_backend(backend)  # validates the name
        self.num_experts = num_experts
        self.backend = backend
        self.kernel_interpret: bool | None = None
        # a data slot: `set_backend` fills it with a kernel backend's layout
        self.kernels: KernelLayout | None = nnx.data(None)
        # jax.device_put, not jnp.asarray: in JAX 0.10 the latter compiles an executable per array
        # shape, and packed shapes differ in every layer, so a quantization run's jit caches would
        # grow layer by layer.
        self.basis = nnx.Dict(
            {
                p: nnx.Dict({k: Packed(jax.device_put(v)) for k, v in bases[p].items()})
                for p in PROJECTIONS
            }
        )
        self.meta = tuple(FactorMeta.of(packed[p]) for p in PROJECTIONS)
        self.factors = nnx.Dict(
            {
                p: nnx.Dict(
                    {
                        "perm": Packed(jax.device_put(packed[p].perm)),
                        "payload": nnx.List([Packed(jax.device_put(a)) for a in packed[p].payload]),
                        "scales": nnx.List([Packed(jax.device_put(a)) for a in packed[p].scales]),
                    }
                )
                for p in PROJECTIONS
            }
        )

    # ------------------------------------------------------------------ stored -> float
    def packed_matrix(self, p: str) -> PackedMatrix:
        f = self.factors[p]
        m = self.meta[PROJECTIONS.index(p)]
        return PackedMatrix(
            perm=f["perm"][...],
            payload=tuple(a[...] for a in f["payload"]),
            scales=tuple(a[...] for a in f["scales"]),
            n=m.n,
            group_size=m.group_size,
            seg_bits=m.seg_bits,
            seg_sizes=m.seg_sizes,
        )

    def rank(self, p: str) -> int:
        """Components per expert of projection ``p`` (the stored factors' rows per expert)."""
        return sum(self.meta[PROJECTIONS.index(p)].seg_sizes) // self.num_experts

    def basis_matrix(self, p: str) -> jax.Array | None:
        """Dequantized basis [D, r], or None for the identity (the "no basis" ablation stores
        none)."""
        b = self.basis[p]
        if not basis_lib.has_basis(b):
            return None
        q = basis_lib.basis_codes(b).astype(jnp.float32)
        return q * b["scale"][...].astype(jnp.float32)[:, None] if "scale" in b else q

    def factor_matrix(self, p: str) -> jax.Array:
        """Dequantized factors [E, r, F]."""
        return kernels_api.PackedFactors(self.packed_matrix(p), self.num_experts).dense()

    def dense_weights(self) -> dict[str, jax.Array]:
        """The equivalent dense expert weights (gate/up [E, D, F], down [E, F, D]) — for tests and
        baselines."""
        vg, vu, ud = (self._basis_or_eye(p, self.factor_matrix(p).shape[1]) for p in PROJECTIONS)
        ag, au, bd = (self.factor_matrix(p) for p in PROJECTIONS)
        return {
            "gate": jnp.einsum("dr,erf->edf", vg, ag),
            "up": jnp.einsum("dr,erf->edf", vu, au),
            "down": jnp.einsum("erf,dr->efd", bd, ud),
        }

    def _basis_or_eye(self, p: str, r: int) -> jax.Array:
        v = self.basis_matrix(p)
        return jnp.eye(r, dtype=jnp.float32) if v is None else v

    # ------------------------------------------------------------------ backend switch
    def set_backend(
        self,
        backend: str = "auto",
        tiles: kernels_api.TileConfig | kernels_api.CodeConfig | None = None,
        target: kernels_api.ExpertKernels | None = None,
        interpret: bool | None = None,
    ) -> None:
        """Select the routed-expert backend (`pallas_kernels.api.BACKENDS` or ``"auto"``); builds
        the kernel layout (numpy, once) when a kernel backend may be used.

        ``tiles``: the kernel layout's sizes, a `TileConfig` (``"mosaic_tpu"``) or a `CodeConfig`
        (``"triton"``); default: the backend's. ``target``: an abstract layout to pad to (the
        model-level `set_backend` plans one per group of layers, so they share kernels).
        ``interpret``: run the kernels in interpret mode (default: on CPU only); ``False`` on a CPU
        host lowers the real kernels, e.g. to ``jax.export`` the model for a GPU. Call it eagerly
        (after loading), not under ``jax.jit``.
        """
        resolved = kernels_api.resolve_backend(backend)
        self.backend = backend
        if resolved in kernels_api.KERNEL_BACKENDS:
            built = self._kernel_layout()
            stale = built is None or built.family != resolved or tiles is not None
            if stale or (target is not None and shared_shapes.abstract(built) != target):
                packed = {p: jax.tree.map(np.asarray, self.packed_matrix(p)) for p in PROJECTIONS}
                kern = kernels_api.build_expert_kernels(
                    packed, self.num_experts, resolved, tiles, target
                )
                self.kernels = nnx.data(KernelLayout(jax.device_put(kern)))
        self.kernel_interpret = interpret

    def _kernel_layout(self) -> kernels_api.ExpertKernels | None:
        return self.kernels.get_value() if self.kernels is not None else None

    def kernel_shapes(
        self,
        backend: str,
        tiles: kernels_api.TileConfig | kernels_api.CodeConfig | None = None,
    ) -> kernels_api.ExpertKernels:
        """The kernel layout's shapes and statics for this block (from the bit-widths; nothing is
        built)."""
        packed = {p: self.packed_matrix(p) for p in PROJECTIONS}
        return kernels_api.expert_kernel_shapes(packed, self.num_experts, backend, tiles)

    def resolved_backend(self) -> str:
        """The backend `__call__` uses: ``"auto"`` takes a kernel backend only where it is verified
        and its layout is built."""
        resolved = kernels_api.resolve_backend(self.backend)
        if resolved in kernels_api.KERNEL_BACKENDS:
            built = self._kernel_layout()
            if built is None or built.family != resolved:
                if self.backend != "auto":
                    raise ValueError(
                        f"backend={self.backend!r} needs the kernel layout: call "
                        f"set_backend({self.backend!r}) first"
                    )
                return "xla"
        return resolved

    def packed_factors(self) -> kernels_api.ExpertKernels:
        """The stored factors as the ``"xla"`` / ``"reference"`` backends read them."""
        return kernels_api.ExpertKernels(
            *(
                kernels_api.PackedFactors(self.packed_matrix(p), self.num_experts)
                for p in PROJECTIONS
            )
        )

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        x: jax.Array,
        plan: RoutingPlan,
        bias: dict[str, jax.Array] | None = None,
        act: GluActivation = SWIGLU,
    ) -> jax.Array:
        """x [N, D] -> float32 [N, D], as `models.moe.Experts`; GPT-OSS's `bias` (gate/up [E, F],
        down [E, D]) and clamped `act` run on the "xla" backend unless "reference" is chosen."""
        backend = self.resolved_backend()
        glu = {} if bias is None and act == SWIGLU else {"act": act}
        if bias is not None:
            glu.update(gate_bias=bias["gate"], up_bias=bias["up"])
        if glu and backend != "reference" and self.backend == "auto":
            backend = "xla"
        out = self._routed(x, plan, backend, glu)
        if bias is not None:
            out = out + down_bias_term(plan, bias["down"], x.shape[0])
        return out

    def _routed(self, x: jax.Array, plan: RoutingPlan, backend: str, glu: dict) -> jax.Array:
        dt = x.dtype
        if backend != "xla":
            kern = self.kernels.get_value() if backend != "reference" else self.packed_factors()
            # a layout padded to a shared shape may have a larger rank: zero columns in, extra
            # columns out
            zg = _pad_columns(self._basis_in(x, "gate")[plan.token], kern.gate.r)
            zu = _pad_columns(self._basis_in(x, "up")[plan.token], kern.up.r)
            acc_sorted = kernels_api.swiglu_experts(
                zg,
                zu,
                plan.group_sizes,
                kern,
                backend=backend,
                interpret=self.kernel_interpret,
                **glu,
            )
            acc_sorted = acc_sorted[:, : self.rank("down")]
            return self._basis_out(combine(plan, acc_sorted, x.shape[0]), dt)
        vg, vu, ud = (self.basis_matrix(p) for p in PROJECTIONS)
        zg = (x if vg is None else x @ vg.astype(dt))[plan.token]
        zu = (x if vu is None else x @ vu.astype(dt))[plan.token]
        acc_sorted = kernels_api.swiglu_experts(
            zg, zu, plan.group_sizes, self.packed_factors(), backend="xla", **glu
        ).astype(dt)  # the op returns float32; XLA's grouped matmul computed it in dt
        acc = combine(plan, acc_sorted, x.shape[0])
        return acc if ud is None else acc @ ud.T

    def _basis_in(self, x: jax.Array, p: str) -> jax.Array:
        """``x·V`` reading the stored codes: the per-row scale folds into ``x`` (``x·(Q⊙s) =
        (x⊙s)·Q``), so no float copy of the ``[D, r]`` basis is made per call (decode reads it every
        token)."""
        b = self.basis[p]
        if not basis_lib.has_basis(b):
            return x
        if "scale" in b:
            x = x * b["scale"][...].astype(x.dtype)
        return x @ basis_lib.basis_codes(b).astype(x.dtype)

    def _basis_out(self, acc: jax.Array, dt: Any) -> jax.Array:
        """``acc·Ũᵀ`` (float32) with ``Ũ = Q⊙s`` applied as ``(acc·Qᵀ)⊙s``, operands in the
        activation dtype."""
        b = self.basis["down"]
        if not basis_lib.has_basis(b):
            return acc
        q = basis_lib.basis_codes(b).astype(dt)
        y = jnp.matmul(acc.astype(dt), q.T, preferred_element_type=jnp.float32)
        return y * b["scale"][...].astype(jnp.float32) if "scale" in b else y

    # ------------------------------------------------------------------ accounting / I/O
    def stored_bits(self) -> int:
        """Every stored bit: bases (codes + scales) and packed factors (words, scales,
        permutation)."""
        total = 0
        for p in PROJECTIONS:
            total += 8 * basis_lib.basis_nbytes(self.basis[p])
            total += self.packed_matrix(p).stored_bits()
        return total

    def stored_arrays(self) -> dict:
        """The stored arrays where they live (device arrays), in `to_tree`'s structure."""
        return {
            "basis": {p: {k: v[...] for k, v in self.basis[p].items()} for p in PROJECTIONS},
            "factors": {
                p: {
                    "perm": self.factors[p]["perm"][...],
                    "payload": {str(i): a[...] for i, a in enumerate(self.factors[p]["payload"])},
                    "scales": {str(i): a[...] for i, a in enumerate(self.factors[p]["scales"])},
                }
                for p in PROJECTIONS
            },
        }

    def tree_meta(self) -> dict:
        """`to_tree`'s JSON metadata."""
        return {
            "num_experts": self.num_experts,
            "factors": {p: m.to_json() for p, m in zip(PROJECTIONS, self.meta, strict=False)},
        }

    def to_tree(self) -> tuple[dict, dict]:
        """(arrays for orbax, JSON metadata) — the inverse of `from_tree`."""
        return jax.tree.map(np.asarray, self.stored_arrays()), self.tree_meta()

    @classmethod
    def from_tree(cls, arrays: dict, meta: dict, backend: str = "auto") -> QuantizedExperts:
        packed = packed_from_tree(arrays, meta)
        # A model without shared bases ("none") stores empty dicts, which some tree formats drop.
        bases = {
            p: {k: np.asarray(v) for k, v in arrays.get("basis", {}).get(p, {}).items()}
            for p in PROJECTIONS
        }
        return cls(int(meta["num_experts"]), bases, packed, backend)


def packed_from_tree(arrays: dict, meta: dict) -> dict[str, PackedMatrix]:
    """Each projection's `PackedMatrix` of `to_tree`'s (arrays, metadata), on the host as given
    (memory-mapped arrays stay mapped: a writer slicing some experts' rows reads only those)."""
    packed = {}
    for p in PROJECTIONS:
        m, f = meta["factors"][p], arrays["factors"][p]
        nseg = len(m["seg_bits"])
        packed[p] = PackedMatrix(
            perm=np.asarray(f["perm"]),
            payload=tuple(f["payload"][str(i)] for i in range(nseg)),
            scales=tuple(f["scales"][str(i)] for i in range(nseg)),
            n=int(m["n"]),
            group_size=int(m["group_size"]),
            seg_bits=tuple(int(b) for b in m["seg_bits"]),
            seg_sizes=tuple(int(s) for s in m["seg_sizes"]),
        )
    return packed


def _pad_columns(z: jax.Array, width: int) -> jax.Array:
    return z if z.shape[1] == width else jnp.pad(z, ((0, 0), (0, width - z.shape[1])))


def set_backend(
    model: nnx.Module,
    backend: str = "auto",
    tiles: kernels_api.TileConfig | kernels_api.CodeConfig | None = None,
    max_padding: float = 0.05,
    interpret: bool | None = None,
) -> int:
    """`QuantizedExperts.set_backend` on every quantized expert block of ``model``; returns how
    many.

    With a kernel backend the blocks' kernel layouts are padded to shared shapes first
    (`pallas_kernels.shared_shapes`), so that layers share compiled kernels: at most ``max_padding``
    extra device memory per group of layers (0 shares identical shapes only). The grouping is
    logged (`logging`, INFO); `plan_kernel_shapes` returns it.
    """
    blocks = [node for _, node in nnx.iter_graph(model) if isinstance(node, QuantizedExperts)]
    targets: list = [None] * len(blocks)
    resolved = kernels_api.resolve_backend(backend)
    if blocks and resolved in kernels_api.KERNEL_BACKENDS:
        plan = plan_kernel_shapes(blocks, resolved, tiles, max_padding)
        targets = [kernels_api.ExpertKernels(*plan.targets[g]) for g in plan.group_of]
        _log.info(plan.summary())
    for block, target in zip(blocks, targets, strict=True):
        block.set_backend(backend, tiles, target, interpret)
    return len(blocks)


def plan_kernel_shapes(
    blocks: list[QuantizedExperts],
    backend: str,
    tiles: kernels_api.TileConfig | kernels_api.CodeConfig | None = None,
    max_padding: float = 0.05,
) -> shared_shapes.SharedShapes:
    """Which blocks share one kernel shape (from their bit-widths alone; see
    `shared_shapes.plan_groups`)."""
    shapes = [block.kernel_shapes(backend, tiles) for block in blocks]
    return shared_shapes.plan_groups([k.parts() for k in shapes], max_padding)


def pack_layer(
    problem: LayerProblem,
    bits: dict[str, np.ndarray],
    layout: ExpertLayout | None = None,
    chunk: int | None = None,
    fn: ExpertFn = PLAIN,
    tuning: ScaleTuning | None = None,
    stats: TuningStats | None = None,
    own_only: bool = False,
) -> QuantizedExperts:
    """The served block of one MoE layer: its units rounded and packed at the allocated bits
    (`method.streamed.round_and_pack`, which says what `layout` shards; `chunk` experts per
    device at a time; `tuning`: the experts' scales fitted after rounding).

    `own_only` (several processes): the block of this process's experts only
    (`layout.local_experts()`, consecutive), a shard that `merge_expert_shards` joins with the
    other processes' into the layer's block."""
    bases, packed = round_and_pack(problem, bits, layout, chunk, fn, tuning, stats, own_only)
    count = problem.num_experts
    if own_only and layout is not None and layout.spans_processes:
        count = len(layout.local_experts())
    return QuantizedExperts(count, bases, packed)


def merge_expert_shards(
    shards: Sequence[QuantizedExperts], backend: str = "auto"
) -> QuantizedExperts:
    """One layer's block from the blocks of its consecutive experts' shards, in expert order
    (`pack_layer(own_only=True)` on each process): the same arrays as one process packing every
    expert. The shared bases are every shard's; the first's are kept."""
    if not shards:
        raise ValueError("no expert shards to merge")
    packed = {p: merge_shards([s.packed_matrix(p) for s in shards]) for p in PROJECTIONS}
    bases = {p: {k: np.asarray(v[...]) for k, v in shards[0].basis[p].items()} for p in PROJECTIONS}
    return QuantizedExperts(sum(s.num_experts for s in shards), bases, packed, backend)
