"""Baselines measured in the same framework as BitsMoE (same model, text, bit accounting)."""
