"""Expert-wise mixed precision: bits per expert from router-norm change and intra-neuron variance.

Baseline after "Efficient Quantization of Mixture-of-Experts with Theoretical Generalization
Guarantees" (arXiv, 2026). Only the abstract is available; its two rules are:

1. Bits are assigned to each expert *primarily* by the change of its router row's l2 norm during
   training. Experts whose router rows changed less capture less frequent but critical features;
   the model is more sensitive to their quantization, so they get **more** bits.
2. Experts with a large *maximum intra-neuron variance* are also given higher precision, so that no
   expert whose quantization would inject large noise is left at low precision.

Everything below is our concrete, documented reading of those two sentences.

Router-norm change and the missing initialisation
-------------------------------------------------
The router kernel is ``[D, E]``: column ``e`` is expert ``e``'s router row ``r_e``. The exact change
is ``||r_e - r_e^0||`` and needs the router's initial weights ``r^0``, which a pretrained checkpoint
does not ship. When ``router_init`` is given we use the exact change. Otherwise we use ``||r_e||``
as the ranking key. Justification (an approximation, stated plainly): every router row is drawn
from the same i.i.d. initialisation, so its initial norm ``||r_e^0||`` is (up to sampling noise
that vanishes as ``D`` grows) the same constant ``c`` for all experts, and a row that moved little
stays near norm ``c`` while a row that moved a lot grows, so the change is approximated by
``||r_e|| - c``. Since ``c`` is shared, ranking by ``||r_e||`` is ranking by the approximate change:
smaller norm => smaller change => more bits. This ignores rows that shrank during training and the
direction of the update; with ``router_init`` the exact value is used instead.

Intra-neuron variance
---------------------
A "neuron" of expert ``e`` is an intermediate (FFN) unit ``f``: its weights are the input columns
``gate[e][:, f]`` and ``up[e][:, f]`` (``D`` values each) and the output row ``down[e][f, :]``
(``D`` values). Its variance is the population variance (ddof=0) of these ``3 D`` values pooled
together; the expert's score is the maximum over its ``F`` neurons. We pool rather than take a
per-matrix variance and then the max because the theory treats a neuron (input weights + output
weight) as one unit whose whole weight vector is perturbed by quantization; pooling also counts a
neuron whose gate/up/down live at different scales as high-variance, which is exactly the case
where a shared low bit-width injects large relative noise.

High-variance experts are those whose score is strictly above the ``variance_quantile`` quantile of
the scores over experts (numpy's default linear interpolation); ``variance_quantile=None`` protects
no expert.

Allocation
----------
Every expert gets ``low_bits`` or ``high_bits``. By default they are the integers bracketing the
target code bits ``budget_bits - 16 / group_size`` (one bf16 scale per group): ``low = floor``,
``high = low + 1``. All experts have the same size, so the mean effective bits with ``n`` high-bit
experts is ``low + n (high - low) / E + 16 / group_size``; ``n`` is the largest count with that mean
``<= budget_bits`` (1e-9 tolerance). The ``n`` high-bit experts are taken in priority order:
high-variance experts first (protection), then the rest; within each group ascending router-norm
change, ties broken by expert index. A budget below ``low_bits + 16 / group_size`` is a ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from bitsmoe_jax.baselines.rtn import rtn_quantize

MIN_BITS = 2  # symmetric RTN with 1 bit has qmax = 0 and no representable nonzero level
_TOL = 1e-9

Quantizer = Callable[[np.ndarray, int, int, int], np.ndarray]


def intra_neuron_variance(gate, up, down) -> np.ndarray:
    """[E]: per expert, the max over intermediate units f of the variance of the unit's 3D weights.

    gate, up: [E, D, F] (x @ W); down: [E, F, D]. Unit f's weights are gate[e][:, f], up[e][:, f]
    and down[e][f, :], pooled into one vector of 3 D values (population variance).
    """
    gate = np.asarray(gate, np.float64)
    up = np.asarray(up, np.float64)
    down = np.asarray(down, np.float64)
    if gate.ndim != 3 or gate.shape != up.shape:
        raise ValueError(f"gate/up must both be [E, D, F], got {gate.shape} and {up.shape}")
    e, d, f = gate.shape
    if down.shape != (e, f, d):
        raise ValueError(f"down must be [E, F, D] = {(e, f, d)}, got {down.shape}")
    per_neuron = np.concatenate(
        [np.swapaxes(gate, 1, 2), np.swapaxes(up, 1, 2), down], axis=-1
    )  # [E, F, 3D]
    return per_neuron.var(axis=-1).max(axis=-1)


@dataclasses.dataclass(frozen=True)
class ExpertScores:
    """Ranking inputs for `allocate_expert_bits`.

    router_change: [E] exact ||r_e - r_e^0|| if `exact`, else the proxy ||r_e|| (see module doc).
    variance: [E] max intra-neuron variance. high_variance: [E] bool, the protected experts.
    """

    router_change: np.ndarray
    variance: np.ndarray
    high_variance: np.ndarray
    exact: bool

    @property
    def num_experts(self) -> int:
        return int(self.router_change.shape[0])


def expert_scores(
    router_kernel,
    gate,
    up,
    down,
    router_init=None,
    variance_quantile: float | None = 0.75,
) -> ExpertScores:
    """Router-norm change (exact with `router_init`, else ||r_e||) and the high-variance set."""
    router = np.asarray(router_kernel, np.float64)
    if router.ndim != 2:
        raise ValueError(f"router kernel must be [D, E], got {router.shape}")
    variance = intra_neuron_variance(gate, up, down)
    e = variance.shape[0]
    if router.shape != (np.asarray(gate).shape[1], e):
        raise ValueError(
            f"router kernel must be [D, E] = {(np.asarray(gate).shape[1], e)}, got {router.shape}"
        )
    if router_init is not None:
        init = np.asarray(router_init, np.float64)
        if init.shape != router.shape:
            raise ValueError(
                f"router_init shape {init.shape} != router kernel shape {router.shape}"
            )
        change = np.linalg.norm(router - init, axis=0)
    else:
        change = np.linalg.norm(router, axis=0)
    if variance_quantile is None:
        high = np.zeros(e, bool)
    else:
        if not 0.0 <= variance_quantile <= 1.0:
            raise ValueError(f"variance_quantile must be in [0, 1], got {variance_quantile}")
        high = variance > np.quantile(variance, variance_quantile)
    return ExpertScores(change, variance, high, router_init is not None)


def expert_priority(scores: ExpertScores) -> np.ndarray:
    """Expert indices, first to receive high bits first."""
    idx = np.arange(scores.num_experts)
    # np.lexsort: last key is primary.
    return np.lexsort((idx, scores.router_change, ~scores.high_variance))


def allocate_expert_bits(
    scores: ExpertScores,
    budget_bits: float,
    low_bits: int | None = None,
    high_bits: int | None = None,
    group_size: int = 128,
) -> np.ndarray:
    """[E] ints in {low_bits, high_bits}: the most high-bit experts whose mean bpw fits the
    budget."""
    overhead = 16.0 / group_size
    target = budget_bits - overhead
    if low_bits is None:
        low_bits = max(MIN_BITS, math.floor(target + _TOL))
    if high_bits is None:
        high_bits = low_bits + 1
    low_bits, high_bits = int(low_bits), int(high_bits)
    if low_bits < MIN_BITS or high_bits <= low_bits:
        raise ValueError(
            f"need {MIN_BITS} <= low_bits < high_bits, got low={low_bits}, high={high_bits}"
        )
    if budget_bits < low_bits + overhead - _TOL:
        raise ValueError(
            f"budget {budget_bits} bits/weight is below the minimum low_bits + 16/group_size = "
            f"{low_bits} + {overhead} = {low_bits + overhead}"
        )
    e = scores.num_experts
    n = 0
    while (
        n < e and low_bits + (n + 1) * (high_bits - low_bits) / e + overhead <= budget_bits + _TOL
    ):
        n += 1
    bits = np.full(e, low_bits, np.int64)
    bits[expert_priority(scores)[:n]] = high_bits
    return bits


def expertwise_quantize(
    gate,
    up,
    down,
    router_kernel,
    budget_bits: float,
    group_size: int = 128,
    quantizer: Quantizer | None = None,
    router_init=None,
    variance_quantile: float | None = 0.75,
    low_bits: int | None = None,
    high_bits: int | None = None,
) -> dict:
    """Quantize each expert at its allocated bits; groups along the contraction axis (0 per expert).

    Returns dict(gate, up, down [float32, same shapes], bits [E] ints, bpw = mean(bits) + 16/G).
    """
    quantizer = rtn_quantize if quantizer is None else quantizer
    scores = expert_scores(router_kernel, gate, up, down, router_init, variance_quantile)
    bits = allocate_expert_bits(scores, budget_bits, low_bits, high_bits, group_size)
    out = {}
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        w = np.asarray(w, np.float32)
        out[name] = np.stack(
            [
                np.asarray(quantizer(w[i], int(bits[i]), group_size, 0), np.float32)
                for i in range(w.shape[0])
            ]
        )
    out["bits"] = bits
    out["bpw"] = float(bits.mean() + 16.0 / group_size)
    return out
