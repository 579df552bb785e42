"""Bounds checks for every ref access of a Pallas kernel run in the generic interpreter.

Why: the generic interpreter evaluates a kernel's loads and stores as ``dynamic_slice`` and
``dynamic_update_slice``, which *clamp* an out-of-range start into the array. On a GPU, the Triton
backend does no bounds checks: the same access reads or writes past the buffer. A read whose value
is multiplied by zero (a dead code slot, a padding row) passes every interpret-mode comparison,
and on the GPU it reads whatever lies beyond, NaN included, or faults. This catches such accesses
on CPU, before a GPU run.

`checked_ref_bounds` wraps the state-discharge rules that the interpreter applies to ``ref[...]``
reads and writes, to Pallas' masked ``load`` / ``store`` and to Triton's ``atomic_add``. Each
access then also computes, per grid step, whether any index lies outside the shape the indexer
refers to (for masked accesses, only the elements the mask keeps), and on a violation calls back to
the host to record it. These are JAX
internals (checked on 0.10 and 0.11): when they move, the context manager fails loudly instead of
checking nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util
from jax._src.state.indexing import NDIndexer, Slice


def _primitives() -> dict[str, Any]:
    from jax._src.pallas import primitives as pallas_primitives
    from jax._src.state import primitives as state_primitives

    prims = {
        "get": state_primitives.get_p,
        "swap": state_primitives.swap_p,
        "addupdate": state_primitives.addupdate_p,
        "masked_load": pallas_primitives.load_p,
        "masked_swap": pallas_primitives.swap_p,
    }
    try:
        from jax._src.pallas.triton import primitives as triton_primitives

        prims["atomic_rmw"] = triton_primitives.atomic_rmw_p
    except ImportError:  # a JAX without the Triton backend has no Triton atomics to check
        pass
    return prims


def _operands(kind: str, values: tuple, params: dict) -> tuple[tuple, Any]:
    """``(transforms, mask)`` of one access, from the discharge rule's operands."""
    if kind in ("get", "swap", "addupdate"):
        n_values = 1 if kind == "get" else 2  # (ref,) or (ref, value), then the flattened indexers
        return tuple(tree_util.tree_unflatten(params["tree"], values[n_values:])), None
    args = params["args_tree"].unflatten(values)
    if kind == "masked_load":
        _, transforms, mask, _ = args
    else:  # masked_swap, atomic_rmw: (ref, transforms, value, mask)
        _, transforms, _, mask = args
    return tuple(transforms), mask


def _out_of_bounds(indexer, mask) -> jax.Array:
    """Scalar bool: does this indexer reach outside ``indexer.shape`` (where ``mask`` keeps
    elements)?"""
    bad = jnp.zeros((), bool)
    slices_and_scalars = all(isinstance(i, Slice) or not jnp.shape(i) for i in indexer.indices)
    if mask is not None and not slices_and_scalars:
        raise NotImplementedError("bounds of a masked gather are not checked")
    axis = 0  # the result axis of the next slice (scalar indices drop theirs)
    for index, dim in zip(indexer.indices, indexer.shape, strict=False):
        if isinstance(index, Slice):
            if index.size == 0:
                continue
            if mask is None:
                last = index.start + (index.size - 1) * index.stride
                bad |= (index.start < 0) | (last >= dim)
            else:
                shape = tuple(1 if a != axis else index.size for a in range(jnp.ndim(mask)))
                pos = index.start + index.stride * jax.lax.broadcasted_iota(jnp.int32, shape, axis)
                bad |= jnp.any(mask & ((pos < 0) | (pos >= dim)))
            axis += 1
        else:
            out = jnp.any((index < 0) | (index >= dim))
            bad |= out if mask is None else out & jnp.any(mask)
    return bad


def _starts(indexer) -> list[jax.Array]:
    return [
        jnp.asarray(i.start if isinstance(i, Slice) else jnp.min(i), jnp.int32)
        for i in indexer.indices
    ]


def _wrap(kind: str, rule, violations: list[str]):
    def checked(*args, **params):
        lead = (
            1 if hasattr(args[0], "in_avals") else 2
        )  # 0.11: (ctx, *values); 0.10: (in_avals, out_avals, *values)
        transforms, mask = _operands(kind, args[lead:], params)
        indexers = [t for t in transforms if isinstance(t, NDIndexer)]
        for n, indexer in enumerate(indexers):
            last = n == len(indexers) - 1
            bad = _out_of_bounds(indexer, mask if last else None)
            what = f"{kind} on a ref view of shape {tuple(indexer.shape)}, indexer {n}"

            def report(*starts, what=what):
                violations.append(f"{what}: starts {[int(s) for s in starts]}")

            # the host callback only on a violation: a callback per access and grid step is most of
            # the cost
            jax.lax.cond(
                bad, lambda *s: jax.debug.callback(report, *s), lambda *s: None, *_starts(indexer)
            )
        return rule(*args, **params)

    return checked


@contextlib.contextmanager
def checked_ref_bounds() -> Iterator[list[str]]:
    """Inside the block, kernels traced for the generic interpreter record their out-of-bounds
    accesses in the yielded list (one line each: access kind, shape, starts). Caches are cleared on
    entry and exit, so no trace from outside the block is reused, nor a checked one after it."""
    from jax._src.state import discharge

    rules = discharge._discharge_rules
    violations: list[str] = []
    originals = {}
    for kind, prim in _primitives().items():
        if prim not in rules:
            raise RuntimeError(
                f"JAX has no discharge rule for {prim}: the bounds check would check nothing"
            )
        originals[prim] = rules[prim]
        rules[prim] = _wrap(kind, rules[prim], violations)
    jax.clear_caches()
    try:
        yield violations
    finally:
        rules.update(originals)
        jax.clear_caches()


def first_violations(violations: list[str], n: int = 5) -> str:
    """The distinct violations, the first ``n`` of them, for an assertion message."""
    distinct = list(dict.fromkeys(violations))
    return f"{len(distinct)} distinct out-of-bounds accesses, e.g.\n" + "\n".join(distinct[:n])
