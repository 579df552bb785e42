"""`release_freed_memory`: the freed heap pages of a chunk of experts stop being resident."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from bitsmoe_jax.method.heap import release_freed_memory

MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_freed_heap_pages_are_given_back():
    # 200 MiB in blocks below glibc's mmap threshold (heap memory), then one more block that pins
    # the heap's top, so freeing the rest cannot shrink the heap by itself
    blocks = [np.ones(100 * 1024 // 8) for _ in range(2000)]
    pin = np.ones(100 * 1024 // 8)
    before = _rss()
    del blocks
    assert release_freed_memory()
    after = _rss()
    assert after <= before - 150 * MIB, (before / MIB, after / MIB)
    assert pin.sum() == pin.size  # still allocated, still readable


def test_without_glibc_it_does_nothing(monkeypatch):
    from bitsmoe_jax.method import heap

    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_freed_memory() is False
