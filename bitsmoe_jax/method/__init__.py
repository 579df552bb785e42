"""The BitsMoE method's math, one module per stage; nothing here knows about configs, files or runs.

calibrate (routing statistics) → decompose (shared bases) → coefficients (loss per unit and width)
→ allocate (bit-widths under a budget) → error_feedback / quantizers (rounding) → packing (bit-plane
words). `layer_problem` strings the stages together for one MoE layer; `sharded` runs the per-expert
work over the "expert" mesh axis, bit-identical on any mesh.
"""
