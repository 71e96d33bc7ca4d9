"""Peak memory and time of a call, for the demo and the benchmarks (Linux: /proc/self)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_rss(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), bytes)``: the resident high-water mark during ``fn`` minus the resident size before.

    Writing 5 to ``/proc/self/clear_refs`` resets the high-water mark (VmHWM) to the current
    resident size. PyTorch's CPU allocator returns large blocks to the OS when they are freed, so
    the resident size is a faithful measure of what a call holds at its peak.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return result, max(0, peak - before) * 1024


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)`` by ``time.perf_counter``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
