"""Per-expert work of one MoE layer sharded over the "expert" mesh axis, bit-identical on any mesh.

What runs where
---------------
* Sharded over experts (`shard_map`, each device its contiguous block of experts): the Gram matrices
  of the shared bases, the routing statistics, and the exact loss coefficients L(e, k, b).
* Replicated / on the host: the routing plan, the small D×D eigendecompositions, the factor fit, the
  loss weights, the allocation (solved on process 0, broadcast) and the packing — each either small
  or a fixed host computation, and every process needs the packed layer for the next layer's input.

Why the results do not depend on the mesh
-----------------------------------------
The issue asks
for identical allocations and bit-identical packed arrays whether the layer runs on one device,
four, or two processes of two. Float sums in a different order change the last bits, and one flipped
bit can move a rounding decision or an eigenvector's sign, so every result here is made *independent
of the sharding by construction* rather than "close":

1. Per-expert work is elementwise in the expert axis and runs one expert at a time (`lax.map`) with
   shapes that depend only on the layer, never on the number of devices: tokens routed to an expert
   are padded to one capacity (the largest routed count, rounded up to 64 — the same on every mesh),
   with padded rows carrying weight 0. The same compiled per-expert program therefore sees the same
   inputs for expert e wherever e lives.
2. The cross-expert Gram sum is a *fixed* pairwise tree over the experts, padded with zero experts
   to a power of two E'. A device owning E'/n consecutive experts computes exactly its subtree (a
   binary-counter accumulation, so no [E, D, D] intermediate is materialised), and the devices then
   finish the same tree with a butterfly all-reduce: at level l device i adds its partial to that of
   device i XOR 2^l (`ppermute`). IEEE addition is commutative, so both partners get the identical
   node, and after log2(n) levels every device holds the root of the one tree that a single device
   computes too. This is `psum` with a reduction order fixed by the expert index instead of by the
   collective's implementation, at the cost of log2(n) steps of one D×D matrix each. (Reducing in
   float64 would only make a mismatch rarer, not impossible, and is slow on TPU.) It requires the
   number of devices on the expert axis to be a power of two (TPU slices and GPU hosts are).

The routing statistics are summed over an expert's tokens inside that expert's program (float32 at
HIGHEST precision), so they too are independent of the mesh. Starved experts (fewer than
`min_tokens` routed tokens) use their all-token fallback in a second pass of the same per-expert
program, run on each process's first device over the starved experts only.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitsmoe_jax.method.quantizers import unit_errors
from bitsmoe_jax.models.moe import PLAIN, ExpertFn, GluActivation
from bitsmoe_jax.parallel.distributed import EXPERT_AXIS, DistributedError

_HIGHEST = jax.lax.Precision.HIGHEST
CAPACITY_MULTIPLE = 64  # padded token capacity per expert: fewer recompilations across layers


def shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map` (JAX ≥ 0.7) or `jax.experimental.shard_map.shard_map` (older), same call."""
    if hasattr(jax, "shard_map"):
        params = inspect.signature(jax.shard_map).parameters
        kw = {"check_vma": False} if "check_vma" in params else {}
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw)
    from jax.experimental.shard_map import shard_map as _legacy  # pragma: no cover - old JAX

    return _legacy(f, mesh, in_specs, out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class Round:
    """Local expert slots [lo, hi) of every device's block: one streamed chunk of a layer."""

    lo: int
    hi: int


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Experts 0..E-1 padded to `padded` (a power of two) and split in `mesh.size` equal blocks."""

    mesh: Mesh
    num_experts: int
    padded: int

    @property
    def per_device(self) -> int:
        return self.padded // self.mesh.size

    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(EXPERT_AXIS))

    def rounds(self, chunk: int) -> list[Round]:
        """The streamed passes over every device's block, `chunk` experts per device at a time."""
        c = max(1, int(chunk))
        return [Round(lo, min(lo + c, self.per_device)) for lo in range(0, self.per_device, c)]

    def round_experts(self, rnd: Round) -> list[int]:
        """The experts of a round array, in its order: device i's [i·p + lo, i·p + hi) for every
        device (ids ≥ num_experts are padding, all zeros)."""
        p = self.per_device
        return [i * p + j for i in range(self.mesh.size) for j in range(rnd.lo, rnd.hi)]

    @property
    def spans_processes(self) -> bool:
        """Devices of several processes: per-round results are all-gathered between them."""
        return len({d.process_index for d in self.mesh.devices.flat}) > 1

    def rounds_with_experts(self, chunk: int) -> list[Round]:
        """`rounds` less those that hold only padding on every device (the Gram sum alone needs
        the padded experts: zeros in its tree)."""
        return [
            r
            for r in self.rounds(chunk)
            if any(e < self.num_experts for e in self.round_experts(r))
        ]

    def round_local(self, rnd: Round) -> list[int]:
        """The real experts of a round that live on this process's devices (ascending)."""
        me, p = jax.process_index(), self.per_device
        out = []
        for i, d in enumerate(self.mesh.devices.flat):
            if d.process_index == me:
                out.extend(e for e in range(i * p + rnd.lo, i * p + rnd.hi) if e < self.num_experts)
        return sorted(out)

    def process_ranges(self) -> list[tuple[int, int, int]]:
        """(first expert, end, process) of each run of consecutive real experts held by one
        process's devices, in expert order (one per process on the usual meshes, whose devices
        are ordered by process)."""
        out: list[tuple[int, int, int]] = []
        p = self.per_device
        for i, d in enumerate(self.mesh.devices.flat):
            lo, hi = i * p, min((i + 1) * p, self.num_experts)
            if lo >= hi:
                continue
            if out and out[-1][2] == d.process_index and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi, d.process_index)
            else:
                out.append((lo, hi, d.process_index))
        return out

    def local_experts(self) -> list[int]:
        """The real experts whose block lives on one of this process's devices (ascending)."""
        me = jax.process_index()
        out: list[int] = []
        for i, d in enumerate(self.mesh.devices.flat):
            if d.process_index == me:
                out.extend(
                    range(i * self.per_device, min((i + 1) * self.per_device, self.num_experts))
                )
        return sorted(out)


def single_device_mesh() -> Mesh:
    """The mesh of a run that was given none: this process's first device."""
    return Mesh(np.asarray(jax.local_devices()[:1]), (EXPERT_AXIS,))


def expert_layout(mesh: Mesh, num_experts: int) -> ExpertLayout:
    n = int(mesh.size)
    if n & (n - 1):
        raise DistributedError(
            f"the expert mesh has {n} devices; the order-fixed Gram reduction needs a power of two "
            "(set config.mesh_shape to one, e.g. (4,))"
        )
    padded = 1
    while padded < max(num_experts, n):
        padded *= 2
    return ExpertLayout(mesh, int(num_experts), padded)


def expert_array(
    layout: ExpertLayout, get: Callable[[int], np.ndarray], item_shape: Sequence[int], dtype: Any
) -> jax.Array:
    """A global [E', *item_shape] array sharded over experts; `get(e)` supplies expert e (real ones
    only).

    Each process is asked only for the experts of its own devices; padded experts are zeros.
    """
    shape = (layout.padded, *item_shape)
    zero = np.zeros(item_shape, dtype)

    def block(index: tuple[slice, ...]) -> np.ndarray:
        s = index[0]
        experts = range(s.start or 0, layout.padded if s.stop is None else s.stop)
        return np.stack(
            [np.asarray(get(e), dtype) if e < layout.num_experts else zero for e in experts]
        )

    return jax.make_array_from_callback(shape, layout.sharding(), block)


def round_array(
    layout: ExpertLayout,
    rnd: Round,
    get: Callable[[int], np.ndarray],
    item_shape: Sequence[int],
    dtype: Any,
) -> jax.Array:
    """A [mesh.size · (hi − lo), *item_shape] array sharded over experts holding the round's
    experts (`round_experts` order); `get(e)` is asked only for this process's real experts."""
    ids = layout.round_experts(rnd)
    zero = np.zeros(item_shape, dtype)

    def block(index: tuple[slice, ...]) -> np.ndarray:
        s = index[0]
        rows = ids[s.start or 0 : len(ids) if s.stop is None else s.stop]
        return np.stack(
            [np.asarray(get(e), dtype) if e < layout.num_experts else zero for e in rows]
        )

    return jax.make_array_from_callback((len(ids), *item_shape), layout.sharding(), block)


def round_local_rows(layout: ExpertLayout, rnd: Round, arr: jax.Array) -> dict[int, np.ndarray]:
    """This process's real experts' entries of a round array: {expert: numpy row}."""
    ids = layout.round_experts(rnd)
    out: dict[int, np.ndarray] = {}
    for shard in arr.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for j in range(data.shape[0]):
            e = ids[start + j]
            if e < layout.num_experts:
                out[e] = data[j]
    return out


def round_gather(layout: ExpertLayout, rnd: Round, arr: jax.Array) -> dict[int, np.ndarray]:
    """Every real expert's entry of a round array, on every process (an all-gather of the round)."""
    ids = layout.round_experts(rnd)
    full = np.asarray(_replicate_fn(layout.mesh)(arr).addressable_data(0))
    return {e: full[j] for j, e in enumerate(ids) if e < layout.num_experts}


@functools.cache
def _replicate_fn(mesh: Mesh) -> Callable:
    """An all-gather: the identity with a replicated output sharding (one jitted function per
    mesh)."""
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))


def gather_experts(layout: ExpertLayout, arr: jax.Array) -> np.ndarray:
    """All experts' rows of a sharded [E', ...] array on every process, as numpy [E, ...]."""
    replicated = _replicate_fn(layout.mesh)(arr)
    return np.asarray(replicated.addressable_data(0))[: layout.num_experts]


# ------------------------------------------------------------------------------------ Gram sums
def _tree_sum_local(mats: jax.Array, one: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Pairwise-tree sum of `one(mats[j])` over a power-of-two number of experts, in O(log n)
    memory.

    A binary counter: after expert j the stack level l holds the sum of the last complete subtree of
    2^l experts; adding expert j merges as many levels as j has trailing one bits.
    """
    n = mats.shape[0]
    levels = max(1, n.bit_length())
    first = one(mats[0])
    stack = jnp.zeros((levels, *first.shape), first.dtype)

    def add(j, stack):
        carry = one(jax.lax.dynamic_index_in_dim(mats, j, keepdims=False))

        def cond(s):
            level, _, _ = s
            return (j >> level) & 1 == 1

        def merge(s):
            level, carry, stack = s
            return level + 1, stack[level] + carry, stack

        level, carry, stack = jax.lax.while_loop(cond, merge, (jnp.int32(0), carry, stack))
        return stack.at[level].set(carry)

    stack = jax.lax.fori_loop(0, n, add, stack)
    return stack[levels - 1]


def _butterfly_sum(x: jax.Array, n: int) -> jax.Array:
    """Order-fixed all-reduce over the expert axis: the top levels of the same pairwise tree."""
    level = 1
    while level < n:
        perm = [(i, i ^ level) for i in range(n)]
        x = x + jax.lax.ppermute(x, EXPERT_AXIS, perm)
        level *= 2
    return x


@functools.cache
def _gram_fn(mesh: Mesh, contract_first: bool) -> Callable:
    n = int(mesh.size)

    def one(w):  # w: one expert's [D, F] (contract F) or [F, D] (contract F, the first axis)
        w = w.astype(jnp.float32)
        if contract_first:
            return jnp.einsum(
                "fd,fk->dk", w, w, precision=_HIGHEST, preferred_element_type=jnp.float32
            )
        return jnp.einsum("df,kf->dk", w, w, precision=_HIGHEST, preferred_element_type=jnp.float32)

    def body(block):
        return _butterfly_sum(_tree_sum_local(block, one), n)[None]

    return jax.jit(shard_map(body, mesh, in_specs=(P(EXPERT_AXIS),), out_specs=P(EXPERT_AXIS)))


@functools.cache
def _expert_grams_fn(mesh: Mesh, contract_first: bool) -> Callable:
    def one(w):  # the same per-expert product as `_gram_fn`'s
        w = w.astype(jnp.float32)
        if contract_first:
            return jnp.einsum(
                "fd,fk->dk", w, w, precision=_HIGHEST, preferred_element_type=jnp.float32
            )
        return jnp.einsum("df,kf->dk", w, w, precision=_HIGHEST, preferred_element_type=jnp.float32)

    e = P(EXPERT_AXIS)
    return jax.jit(shard_map(lambda b: jax.lax.map(one, b), mesh, in_specs=(e,), out_specs=e))


@functools.cache
def _butterfly_fn(mesh: Mesh) -> Callable:
    n = int(mesh.size)
    e = P(EXPERT_AXIS)
    return jax.jit(shard_map(lambda x: _butterfly_sum(x, n), mesh, in_specs=(e,), out_specs=e))


class GramAccumulator:
    """Σ_e of one projection's per-expert Gram matrices, fed a round at a time, in the one pairwise
    tree `gram_sum` uses: each device's block is folded by a binary counter in expert order (the
    open subtrees are the only partial sums alive — at most log2 of the block), and the device
    roots are finished by the same butterfly. Bit-identical to `gram_sum` for every chunk size."""

    def __init__(self, layout: ExpertLayout, contract_first: bool):
        self.layout = layout
        self.contract_first = contract_first
        self.stacks: dict[int, dict[int, np.ndarray]] = {}  # device -> level -> subtree sum
        self.seen: dict[int, int] = {}

    def add_round(self, rnd: Round, get: Callable[[int], np.ndarray], item_shape) -> None:
        lay = self.layout
        arr = round_array(lay, rnd, get, item_shape, np.float32)
        grams = _expert_grams_fn(lay.mesh, self.contract_first)(arr)
        width = rnd.hi - rnd.lo
        for shard in grams.addressable_shards:
            device = (shard.index[0].start or 0) // width
            data = np.asarray(shard.data)
            stack = self.stacks.setdefault(device, {})
            for k in range(width):
                j = rnd.lo + k
                carry, level = data[k], 0
                while (j >> level) & 1:
                    carry = stack.pop(level) + carry
                    level += 1
                stack[level] = carry
            del data

    def result(self) -> np.ndarray:
        lay = self.layout
        top = max(1, lay.per_device.bit_length()) - 1
        roots = {dev: stack[top] for dev, stack in self.stacks.items()}
        d = next(iter(roots.values())).shape
        arr = jax.make_array_from_callback(
            (lay.mesh.size, *d),
            lay.sharding(),
            lambda index: roots[index[0].start or 0][None],
        )
        out = _butterfly_fn(lay.mesh)(arr)
        return np.asarray(out.addressable_data(0))[0]


def gram_sum(layout: ExpertLayout, w: jax.Array, contract_first: bool) -> np.ndarray:
    """Σ_e W_e W_eᵀ (contract_first=False, W_e [D, F]: gate/up as stored) or Σ_e W_eᵀ W_e
    (contract_first=True, W_e [F, D]: down as stored) over the sharded experts, as float32 numpy [D,
    D].
    """
    out = _gram_fn(layout.mesh, contract_first)(w)
    return np.asarray(out.addressable_data(0))[0]


# ------------------------------------------------------------------------------------ statistics
def _expert_stats_one(x, w, gate, up, vg, vu):
    """One expert's statistic sums over its (padded) tokens: s_gate [F, rg], s_up [F, ru], c_down
    [F], mass.

    x [C, D] routed inputs, w [C] routing weights (0 on padding); gate / up [D, F]; vg / vu [D, r].
    """
    x = x.astype(jnp.float32)
    g = jnp.dot(x, gate.astype(jnp.float32), precision=_HIGHEST)
    u = jnp.dot(x, up.astype(jnp.float32), precision=_HIGHEST)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    dsilu = sig * (1 + g * (1 - sig))
    w2 = (w.astype(jnp.float32) ** 2)[:, None]
    a_gate = w2 * (dsilu * u) ** 2
    a_up = w2 * silu**2
    a_down = w2 * (silu * u) ** 2
    return _stat_sums(x, w2, a_gate, a_up, a_down, vg, vu)


def _stat_sums(x, w2, a_gate, a_up, a_down, vg, vu):
    """The sums of `_expert_stats_one` from its per-token activation weights."""
    zg2 = jnp.dot(x, vg.astype(jnp.float32), precision=_HIGHEST) ** 2
    zu2 = jnp.dot(x, vu.astype(jnp.float32), precision=_HIGHEST) ** 2
    s_gate = jnp.dot(a_gate.T, zg2, precision=_HIGHEST)
    s_up = jnp.dot(a_up.T, zu2, precision=_HIGHEST)
    return s_gate, s_up, jnp.sum(a_down, axis=0), jnp.sum(w2)


def _expert_stats_glu(x, w, gate, up, bg, bu, vg, vu, act: GluActivation):
    """`_expert_stats_one` for GPT-OSS's experts: gate/up biases bg / bu [F] added before the
    clamped activation `act`, whose derivatives (0 where clamped) weight the gate and up loss."""
    x = x.astype(jnp.float32)
    g = jnp.dot(x, gate.astype(jnp.float32), precision=_HIGHEST) + bg.astype(jnp.float32)
    u = jnp.dot(x, up.astype(jnp.float32), precision=_HIGHEST) + bu.astype(jnp.float32)
    h, dh_dg, dh_du = act.with_grads(g, u)
    w2 = (w.astype(jnp.float32) ** 2)[:, None]
    return _stat_sums(x, w2, w2 * dh_dg**2, w2 * dh_du**2, w2 * h**2, vg, vu)


def _map_experts(xs, ws, gate, up, vg, vu):
    return jax.lax.map(lambda a: _expert_stats_one(*a, vg, vu), (xs, ws, gate, up))


@functools.cache
def _stats_fn(mesh: Mesh) -> Callable:
    e = P(EXPERT_AXIS)
    return jax.jit(
        shard_map(_map_experts, mesh, in_specs=(e, e, e, e, P(), P()), out_specs=(e, e, e, e))
    )


@functools.cache
def _glu_stats_fn(mesh: Mesh, act: GluActivation) -> Callable:
    def body(xs, ws, gate, up, bg, bu, vg, vu):
        return jax.lax.map(lambda a: _expert_stats_glu(*a, vg, vu, act), (xs, ws, gate, up, bg, bu))

    e = P(EXPERT_AXIS)
    return jax.jit(shard_map(body, mesh, in_specs=(e,) * 6 + (P(), P()), out_specs=(e, e, e, e)))


def capacity(counts: np.ndarray) -> int:
    """Tokens per expert every per-expert program is padded to: a function of the routing only."""
    c = int(max(1, counts.max()))
    return -(-c // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE


def _routed_rows(
    x: np.ndarray | None, token: np.ndarray | None, weight: np.ndarray, offsets: np.ndarray
) -> tuple[int, Callable[[int], np.ndarray], Callable[[int], np.ndarray]]:
    """(capacity, rows(e), weights(e)): expert e's routed inputs [cap, D] and routing weights
    [cap], padded with zero-weight rows to the one capacity every per-expert program uses (`x`,
    `token`: None when only the weights are wanted)."""
    counts = np.diff(offsets)
    cap = capacity(counts)

    def rows(e: int) -> np.ndarray:
        t = token[offsets[e] : offsets[e + 1]]
        return np.pad(x[t], ((0, cap - len(t)), (0, 0)))

    def wts(e: int) -> np.ndarray:
        return np.pad(weight[offsets[e] : offsets[e + 1]], (0, cap - int(counts[e])))

    return cap, rows, wts


def routed_stats(
    layout: ExpertLayout,
    x: np.ndarray,
    token: np.ndarray,
    weight: np.ndarray,
    offsets: np.ndarray,
    gate: jax.Array,
    up: jax.Array,
    vg: np.ndarray,
    vu: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Per-expert statistics over the routed tokens, sharded over experts; numpy [E, ...] on every
    process.

    x [N, D] MoE inputs; token / weight: the routing plan's sorted assignments and their weights;
    offsets [E+1] of each expert's run in them; gate / up: sharded [E', D, F] expert weights.
    """
    cap, rows, wts = _routed_rows(x, token, weight, offsets)
    d = x.shape[1]

    xs = expert_array(layout, rows, (cap, d), np.float32)
    ws = expert_array(layout, wts, (cap,), np.float32)
    outs = _stats_fn(layout.mesh)(
        xs, ws, gate, up, jnp.asarray(vg, jnp.float32), jnp.asarray(vu, jnp.float32)
    )
    return tuple(gather_experts(layout, o).astype(np.float64) for o in outs)


def routed_stats_round(
    layout: ExpertLayout,
    rnd: Round,
    x: np.ndarray,
    token: np.ndarray,
    weight: np.ndarray,
    offsets: np.ndarray,
    experts: dict[str, dict[int, np.ndarray]],
    shape: tuple[int, int],
    vg: np.ndarray,
    vu: np.ndarray,
    fn: ExpertFn = PLAIN,
) -> dict[int, tuple[np.ndarray, ...]]:
    """`routed_stats` for one round: {expert: (s_gate, s_up, c_down, mass) float32} of this
    process's real experts in it, from `experts` = {"gate"/"up": {expert: `shape` [D, F]}} (its
    own); `fn`: the experts' activation and biases (GPT-OSS)."""
    cap, rows, wts = _routed_rows(x, token, weight, offsets)
    d = x.shape[1]

    args = (
        round_array(layout, rnd, rows, (cap, d), np.float32),
        round_array(layout, rnd, wts, (cap,), np.float32),
        round_array(layout, rnd, experts["gate"].__getitem__, shape, np.float32),
        round_array(layout, rnd, experts["up"].__getitem__, shape, np.float32),
    )
    basis = (jnp.asarray(vg, jnp.float32), jnp.asarray(vu, jnp.float32))
    if fn.plain:
        outs = _stats_fn(layout.mesh)(*args, *basis)
    else:
        zero = np.zeros(shape[1], np.float32)
        biases = tuple(
            round_array(
                layout,
                rnd,
                (lambda e, p=p: zero if fn.bias is None else fn.bias[p][e]),
                (shape[1],),
                np.float32,
            )
            for p in ("gate", "up")
        )
        outs = _glu_stats_fn(layout.mesh, fn.act)(*args, *biases, *basis)
    del args  # the round's inputs and weights: not kept while the outputs are copied out
    local = [round_local_rows(layout, rnd, o) for o in outs]
    del outs
    # float32 as computed (the float64 the statistics are used in is an exact widening, done where
    # each is used: a layer's [F, r] sums in float64 would double the chunk's largest arrays)
    return {e: tuple(np.array(o[e]) for o in local) for e in local[0]}


@jax.jit
def _masses(ws):
    return jax.lax.map(lambda w: jnp.sum((w.astype(jnp.float32) ** 2)[:, None]), ws)


def routed_masses(weight: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Σ_t w_te² of every expert's routed tokens (float64 [E]), computed as the statistics program
    computes it (the same float32 sum over the padded capacity), before any statistic: the loss
    weights of a chunk need every expert's mass."""
    _, _, wts = _routed_rows(None, None, weight, offsets)
    ws = np.stack([wts(e) for e in range(len(offsets) - 1)]).astype(np.float32)
    return np.asarray(_masses(jnp.asarray(ws)), np.float64)


@jax.jit
def _all_token_map(x, ws, gate, up, vg, vu):
    return jax.lax.map(lambda a: _expert_stats_one(x, *a, vg, vu), (ws, gate, up))


@functools.partial(jax.jit, static_argnames=("act",))
def _all_token_map_glu(x, ws, gate, up, bg, bu, vg, vu, act):
    return jax.lax.map(lambda a: _expert_stats_glu(x, *a, vg, vu, act), (ws, gate, up, bg, bu))


def all_token_stats(
    x: np.ndarray,
    weights: np.ndarray,
    gate: np.ndarray,
    up: np.ndarray,
    vg: np.ndarray,
    vu: np.ndarray,
    fn: ExpertFn = PLAIN,
    experts: Sequence[int] = (),
) -> tuple[np.ndarray, ...]:
    """The same per-expert program over every token (the starved-expert fallback), for a few
    experts.

    x [N, D]; weights [S, N] per listed expert; gate / up [S, D, F]; `fn` with `experts` (their
    ids, for the biases): GPT-OSS's experts. Runs unsharded on this process's first device: the
    starved set is small, and this program is the same on every mesh.
    """
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    if fn.plain:
        outs = _all_token_map(*(f32(a) for a in (x, weights, gate, up, vg, vu)))
    else:
        ids = np.asarray(list(experts), np.int64)
        zero = np.zeros((len(ids), np.shape(gate)[-1]), np.float32)
        bg, bu = (zero if fn.bias is None else fn.bias[p][ids] for p in ("gate", "up"))
        outs = _all_token_map_glu(
            *(f32(a) for a in (x, weights, gate, up, bg, bu, vg, vu)), act=fn.act
        )
    return tuple(np.asarray(o, np.float64) for o in outs)


# ------------------------------------------------------------------------------------ coefficients
@functools.cache
def _errors_fn(mesh: Mesh, candidates: tuple[int, ...], group_size: int) -> Callable:

    def body(units, weights):
        return jax.lax.map(
            lambda a: unit_errors(a[0], candidates, group_size, a[1]), (units, weights)
        )

    e = P(EXPERT_AXIS)
    return jax.jit(shard_map(body, mesh, in_specs=(e, e), out_specs=e))


def unit_errors_round(
    layout: ExpertLayout,
    rnd: Round,
    units: dict[int, np.ndarray],
    weights: dict[int, np.ndarray],
    shape: tuple[int, int],
    candidates: Sequence[int],
    group_size: int,
) -> dict[int, np.ndarray]:
    """`unit_errors_sharded` for one round, from this process's experts' units / weights
    ({expert: [r, F]}): {expert: L [r, C]} of every real expert of the round, on every process."""
    u = round_array(layout, rnd, units.__getitem__, shape, np.float32)
    w = round_array(layout, rnd, weights.__getitem__, shape, np.float32)
    out = _errors_fn(layout.mesh, tuple(int(b) for b in candidates), int(group_size))(u, w)
    return round_gather(layout, rnd, out)


def unit_errors_sharded(
    layout: ExpertLayout,
    units: np.ndarray,
    weights: np.ndarray,
    candidates: Sequence[int],
    group_size: int,
) -> np.ndarray:
    """Exact L(e, k, b) for units / weights [E, r, F]: one expert at a time, sharded over experts ->
    [E, r, C]."""
    _, r, f = units.shape
    u = expert_array(layout, lambda e: units[e], (r, f), np.float32)
    w = expert_array(layout, lambda e: weights[e], (r, f), np.float32)
    out = _errors_fn(layout.mesh, tuple(int(b) for b in candidates), int(group_size))(u, w)
    return gather_experts(layout, out)
