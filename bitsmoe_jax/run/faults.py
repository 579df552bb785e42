"""Named fault-injection points: `BITSMOE_FAULT=<point>[:<n>]` kills the process (SIGKILL) there.

The resume tests need a `kill -9` at precise places (mid-layer, between a commit's write and its
rename, right after a commit, while the output is written); a signal sent from outside lands at a
random instant instead. At the n-th time (default the first) the run reaches the named point, the
process sends itself SIGKILL: no `finally`, no `atexit`, exactly what a preemption does.

Points: `layer_computed` (a layer quantized, nothing of it committed), `commit_before_rename`
(a commit's files written and fsynced, not yet renamed), `layer_committed` (right after a layer's
commit), `output_write` (an output directory half written), `output_groups` (a process other
than 0 has written one more layer's groups of experts into the output being written),
`output_renamed` (an output in place,
not yet recorded as done in the work directory), `cleanup` (the finished run's work directory
partly deleted, one visit per deleted entry), `tombstone` (the emptied work directory renamed to its
tombstone and not yet deleted; `pareto.md` not yet written).
"""

from __future__ import annotations

import os
import signal

ENV = "BITSMOE_FAULT"
POINTS = (
    "layer_computed",
    "commit_before_rename",
    "layer_committed",
    "output_write",
    "output_groups",
    "output_renamed",
    "cleanup",
    "tombstone",
)
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Kill this process with SIGKILL if `BITSMOE_FAULT` names this point (and this is its n-th
    visit)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point {target!r}; known: {', '.join(POINTS)}")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
