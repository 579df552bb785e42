"""Pallas kernels for the BitsMoE routed-expert product, reading packed bit-planes.

* `api` — `swiglu_experts` (the two kernels plus the gathers around them), `ExpertKernels`,
  `build_expert_kernels`, and the ``implementation = "pallas" | "xla" | None`` resolution.
* `layout` — the kernel layout derived at load time from the stored `PackedMatrix` (and synthetic
  layouts for benchmarks); its docstring defines the word order.
* `unpack` — in-kernel unpacking shared by both kernel families.
* `routing` — row tiles holding one expert each (the static-grid bound, per-row destinations).
* `triton_gmm` (GPU), `tpu_gmm` (TPU, scalar prefetch) — the kernels; both also run in interpret mode.
* `reference` — a pure-jnp reference on the dequantized factors, for tests.
* `compat` — Pallas API differences between JAX versions.
"""
