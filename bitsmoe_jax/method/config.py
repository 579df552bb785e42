"""The method's parameters as one typed, frozen value: what decides the quantized bits of a layer.

Built once from the command line's config (`run.config_schema.RunConfig.params`) or directly by
research code; the stages take it (or single fields of it), never the config file's ConfigDict.
`run/config_schema.py` holds each field's default, allowed values and validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from bitsmoe_jax.method.expert_scale_tuning import ScaleTuning


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """How units are decomposed, weighed, allocated and rounded (defaults: the method's)."""

    #: bit-widths a unit may get (0 = dropped)
    candidate_bits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8)
    #: values per group scale of the factors
    group_size: int = 128
    #: "svd" (weight Gram), "whitened" (activation-whitened) or "none" (no shared basis)
    basis: str = "svd"
    #: "token_sum" keeps routing frequency in the loss; "expert_mean" (ablation) drops it
    loss_weighting: str = "token_sum"
    #: stored precision of the shared bases: 4 or 6 (bit-plane words) or 8 (int8), each with one
    #: bf16 scale per row; or 16 (bf16). 4 by default: the factors are fitted to the dequantized
    #: basis, so the bits a coarse basis saves buy more than its error costs (docs/quantizing.md)
    basis_bits: int = 4
    #: precisions each layer's bases are chosen from by the allocation's predicted loss at the
    #: layer's share of the first budget (empty: `basis_bits` everywhere); run/basis_precision.py
    basis_bits_choices: tuple[int, ...] = ()
    #: what budget_bits counts: "stored" (every stored bit over the expert weights) or "decode"
    #: (the bits a batch-1 decode step reads per routed expert weight, uniform routing: the bases
    #: count E/k times, so components are kept by their read cost; method/component_selection.py)
    budget_counts: str = "stored"
    #: components kept in the bases (None = full rank)
    rank: int | None = None
    #: "exact" (every unit at every width) or "sampled" (kappa_b * ||unit||^2)
    coefficient_mode: str = "exact"
    #: "gptq" (error feedback in component space) or "nearest" (every unit on its own)
    rounding: str = "gptq"
    #: "auto", "milp" (CVXPY + HiGHS) or "greedy" (lower convex hulls, certified gap)
    allocator: str = "auto"
    #: largest problem "auto" gives the MILP; larger ones go to the greedy
    milp_max_units: int = 10000
    #: seconds HiGHS may spend on one allocation
    milp_time_limit: float = 60.0
    #: experts kept at `super_expert_bits`: indices, {layer: indices}, or "auto"
    super_experts: Sequence[int] | Mapping[str, Sequence[int]] | str = ()
    #: bit-width of super experts (8 or 16)
    super_expert_bits: int = 8
    #: "auto": an expert whose peak |output| exceeds this x the median expert's is super
    super_expert_threshold: float = 8.0
    #: experts routed fewer calibration tokens use every token as if routed
    min_tokens: int = 16
    #: floor on each expert's loss weight, as a fraction of the mean expert's
    expert_mass_floor: float = 0.25
    #: seed of the sampled coefficients
    seed: int = 0
    #: Adam steps fitting each expert's factor scales to its output after rounding (0: off; needs
    #: rounding="gptq", whose calibration inputs it fits on)
    scale_tuning_steps: int = 50
    #: their learning rate, on log-scales
    scale_tuning_lr: float = 0.02
    #: an expert's training tokens per step of that fit (0: all of them every step)
    scale_tuning_batch: int = 512

    def basis_rank(self, hidden: int) -> int:
        """Columns of each stored [D, r] shared basis (0 when there is no basis)."""
        if self.basis == "none":
            return 0
        return hidden if self.rank is None else min(int(self.rank), hidden)

    def scale_tuning(self) -> ScaleTuning | None:
        """The per-expert scale fit after rounding, or None when it is off."""
        if not self.scale_tuning_steps:
            return None
        return ScaleTuning(
            int(self.scale_tuning_steps),
            float(self.scale_tuning_lr),
            int(self.scale_tuning_batch),
        )

    def allocator_options(self) -> dict[str, object]:
        """Keyword arguments of `method.allocate.allocate` (and `layer_problem.allocate_layers`)."""
        return {
            "allocator": self.allocator,
            "milp_max_units": self.milp_max_units,
            "time_limit": self.milp_time_limit,
        }


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MethodConfig))
