"""What a decode step reads per token of a quantized MoE layer, counted from its stored arrays.

Why: decode speed is bytes read, and storage bpw hides it. A BitsMoE layer reads its shared bases
whole on every step (every token goes through them) plus the packed factors of the experts the
step's tokens reach; an expert-wise format (GPTQ, llama.cpp, bf16) reads only the routed experts.
`bench/decode_bytes.py` puts the two side by side at real models' dimensions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsmoe_jax.method.coefficients import PROJECTIONS
from bitsmoe_jax.method.decompose import basis_nbytes

#: Bits per weight of the expert-wise layouts compared against.
LAYOUT_BPW = {
    "GPTQ w2g128": 2 + (16 + 2) / 128,
    "IQ2_XXS": 66 * 8 / 256,
    "Q2_K": 84 * 8 / 256,
    "bf16": 16.0,
}


def distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected number of distinct experts `batch` tokens reach under uniform top-k routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def _row_bytes(a: Any) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize


def layer_read_bytes(arrays: dict[str, Any], meta: dict[str, Any]) -> tuple[int, np.ndarray]:
    """(bytes of the shared bases, bytes of each expert's stored factors [E]) of one MoE layer's
    written `experts_q` arrays (or `QuantizedExperts.stored_arrays()`: only the permutations are
    read, the rest by shape) and its `quantized.json` layer entry.

    Each projection's units are expert-major before packing (expert e owns units e·r ... e·r+r−1);
    `perm` lists, segment after segment, which unit each stored row is, so an expert's rows of a
    segment are the entries of that segment's range of `perm` that fall in its unit range.
    """
    e_count = int(meta["num_experts"])
    bases = 0
    experts = np.zeros(e_count, np.int64)
    for p in PROJECTIONS:
        bases += basis_nbytes(arrays.get("basis", {}).get(p, {}))
        f, m = arrays["factors"][p], meta["factors"][p]
        perm = np.asarray(f["perm"])
        rank = len(perm) // e_count
        owner = perm // rank
        # every expert reads its own entries of the permutation
        experts += np.bincount(owner, minlength=e_count) * perm.dtype.itemsize
        start = 0
        for i, size in enumerate(m["seg_sizes"]):
            rows = np.bincount(owner[start : start + size], minlength=e_count)
            per_row = _row_bytes(f["payload"][str(i)]) + _row_bytes(f["scales"][str(i)])
            experts += rows * per_row
            start += size
    return bases, experts


#: Batch sizes the reports give decode bytes for: one token, and a serving batch.
REPORT_BATCHES = (1, 64)


def per_token_bytes(
    bases: int,
    per_expert: np.ndarray,
    expert_weights: int,
    top_k: int,
    batches: tuple[int, ...] = REPORT_BATCHES,
) -> dict[str, dict[str, float]]:
    """Bytes per token of one MoE layer at each batch size: ours (`layer_read_bytes`' bases and
    per-expert bytes) and the expert-wise layouts of `LAYOUT_BPW` for experts of `expert_weights`
    weights each, under uniform routing (`distinct_experts`)."""
    e_count = len(per_expert)
    out = {}
    for batch in batches:
        n = distinct_experts(e_count, top_k, batch)
        row = {"distinct_experts": n, "bitsmoe": (bases + n * float(per_expert.mean())) / batch}
        row.update({name: n * expert_weights * bpw / 8 / batch for name, bpw in LAYOUT_BPW.items()})
        out[str(batch)] = row
    return out
