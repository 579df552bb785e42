"""`python -m bitsmoe_jax.peak_memory [quantize args]`: quantize, then print the process's peak RSS.

The peak is the kernel's high-water mark of resident memory (`VmHWM` in /proc/self/status, or
`ru_maxrss` where there is no /proc), printed as one JSON line `{"rc": ..., "peak_rss_bytes": ...}`
after the run. `measure(args)` runs it in a fresh subprocess (a process's peak cannot be reset
portably) and returns that dict — what `bench/memory.py` and the memory test use.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

from bitsmoe_jax import quantize


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def measure(
    args: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run `python -m bitsmoe_jax.quantize *args` in a subprocess; {"rc", "peak_rss_bytes",
    "output"}."""
    proc = subprocess.run(
        [sys.executable, "-m", "bitsmoe_jax.peak_memory", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"rc"')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            "quantization failed (exit "
            f"{proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return {**json.loads(lines[-1]), "output": proc.stdout}


def main(argv: list[str] | None = None) -> int:

    rc = quantize.main(sys.argv[1:] if argv is None else argv)
    print(json.dumps({"rc": rc, "peak_rss_bytes": peak_rss_bytes()}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
