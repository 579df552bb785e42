"""The BitsMoE routed-expert product as one op with backends, reading packed low-bit factors.

* `api` — the op: `swiglu_experts(..., backend=)`, `ExpertKernels` (the three projections in a
  backend's layout), `build_expert_kernels`, `expert_kernel_shapes`, `BACKENDS` and `"auto"`.
* `reference` — backend ``"reference"``: a per-row float32 einsum on the dequantized factors.
* `xla` — backend ``"xla"``: dequantize inside the jit, then XLA's grouped matmul (`PackedFactors`).
* `triton/` — backend ``"triton"`` (GPU): `layout` (b-bit integer codes, decoded by the
  float-exponent trick; its docstring defines the format and says why), `kernels` (decode GEMVs
  and the prefill dequantizer), `op` (the product around them).
* `mosaic_tpu/` — backend ``"mosaic_tpu"`` (TPU): `layout` (±1 bit-planes in t-major word order),
  `unpack` (their in-kernel unpacking), `kernels` (scalar-prefetch Mosaic kernels), `op`.
* `tiles` — what both kernel layouts share (per-expert tile tables, tiling by bit-width).
* `routing` — row tiles holding one expert each, and the row gathers both kernel backends use.
* `shared_shapes` — layers' layouts padded to shared shapes, so a model compiles each kernel once.
* `lowered` — the kernel calls in a lowered module (what XLA would compile), for tests and benches.
* `compat` — Pallas API differences between JAX versions.

Every kernel also runs in interpret mode (CPU tests).
"""
