"""What a lowered module asks XLA to compile: its kernel custom calls and their backend configs.

XLA's GPU compiler keeps one compiled kernel per distinct Triton backend config (the serialized
kernel IR, its grid and name) in an executable, so counting distinct configs in ``jax.export``'s
text counts the kernels a GPU would compile, without a GPU. The TPU custom call carries its Mosaic
module the same way. Used by the lowering and shared-shape tests and the benches.
"""

from __future__ import annotations

import contextlib
from typing import Any

CALL_TARGETS = {"triton": "__gpu$xla.gpu.triton", "mosaic_tpu": "tpu_custom_call"}
PLATFORMS = {"triton": "cuda", "mosaic_tpu": "tpu"}


def export_for_hardware(jitted: Any, backend: str, *args: Any) -> Any:
    """``jax.export`` of a jitted function for the hardware of a kernel family (``cuda`` or ``tpu``)
    from any host, nothing allocated. For ``cuda`` under `compat.gpu_export_target` (JAX 0.11 lowers
    Triton only for a named GPU). The Triton custom call has no cross-version compatibility
    guarantee, so that check is off: this checks lowering, not serialization."""
    import jax

    from pallas_kernels.compat import gpu_export_target

    with gpu_export_target() if backend == "triton" else contextlib.nullcontext():
        return jax.export.export(
            jitted,
            platforms=[PLATFORMS[backend]],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(CALL_TARGETS["triton"])],
        )(*args)


def kernel_configs(mlir_text: str, backend: str) -> list[str]:
    """The backend config of every kernel call of ``backend``'s family in a module's text, in
    order."""
    call = f"custom_call @{CALL_TARGETS[backend]}"
    return [attribute(line, "backend_config = ") for line in mlir_text.splitlines() if call in line]


def attribute(line: str, key: str) -> str:
    """The attribute value after ``key`` in one line of MLIR text: a quoted string or a ``{...}``
    dict, quotes and escapes respected."""
    i = j = line.index(key) + len(key)
    depth, quoted = 0, False
    while j < len(line):
        ch = line[j]
        j += 1
        if quoted:
            if ch == "\\":
                j += 1
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        else:
            depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0 and not quoted:
            return line[i:j]
    raise ValueError(f"unterminated attribute {key!r} in {line[:200]}")
