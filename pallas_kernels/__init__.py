"""Pallas kernels for the BitsMoE routed-expert product, decoding packed low-bit weights in
registers.

* `api` — `swiglu_experts` (the kernels plus the gathers around them), `ExpertKernels`,
  `build_expert_kernels`, `expert_kernel_shapes`, and the ``implementation = "pallas" | "xla" |
  None`` resolution.
* `code_layout` — the GPU layout derived at load time from the stored `PackedMatrix`: b-bit integer
  codes decoded by the float-exponent trick (its docstring defines the format and says why).
* `triton_codes` (GPU) — decode GEMVs and the prefill dequantizer over `code_layout`.
* `layout` — the TPU layout: ±1 bit-planes in t-major word order; `unpack` — their in-kernel
  unpacking.
* `tpu_gmm` (TPU, scalar prefetch) — the Mosaic kernels over `layout`.
* `routing` — row tiles holding one expert each (the static-grid bound, per-row destinations).
* `shared_shapes` — layers' layouts padded to shared shapes, so a model compiles each kernel once.
* `lowered` — the kernel calls in a lowered module (what XLA would compile), for tests and benches.
* `reference` — a pure-jnp reference on the dequantized factors, for tests.
* `compat` — Pallas API differences between JAX versions.

Every kernel also runs in interpret mode (CPU tests).
"""
