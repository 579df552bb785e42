"""Quantized models at inference: the routed-expert block on packed factors (`quantized_experts`),
the quantized checkpoint format (`quantized_checkpoint`) and synthetic blocks for benchmarks."""
