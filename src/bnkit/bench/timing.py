"""Timing utilities shared by the benchmarks.

Rules (STYLE.md, rule 9): median of many runs after warm-up, and every time is reported next
to the time of copying the same tensor (``x.clone()``, which keeps the memory format), the
memory-bandwidth yardstick: a batch norm that reads ``x`` once and writes ``y`` once cannot
beat ~1x copy.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

from torch import Tensor

__all__ = ["copy_time", "median_time"]

MIN_RUNS = 15


def median_time(fn: Callable[[], object], runs: int = MIN_RUNS, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in seconds over ``runs`` calls after ``warmup`` calls.

    The median (not the mean or the minimum) because the machine may be shared: it ignores
    the odd preempted run without rewarding a lucky one. ``runs`` below 15 is raised to 15.
    """
    runs = max(int(runs), MIN_RUNS)
    for _ in range(max(0, warmup)):
        fn()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return statistics.median(times)


def copy_time(x: Tensor, runs: int = MIN_RUNS) -> float:
    """Median time of copying ``x`` into a new tensor of the same layout (the yardstick)."""
    return median_time(x.clone, runs=runs)
