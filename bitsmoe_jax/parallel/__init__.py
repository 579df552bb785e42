"""Multi-process JAX: start-up, who logs and writes, barriers with deadlines, the expert mesh."""
