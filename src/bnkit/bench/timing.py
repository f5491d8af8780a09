"""Timing utilities shared by the benchmarks.

Rules (STYLE.md, rule 9): median of many runs after warm-up, and every time is reported next
to the time of copying the same tensor (``x.clone()``, which keeps the memory format), the
memory-bandwidth yardstick: a batch norm that reads ``x`` once and writes ``y`` once cannot
beat ~1x copy.

Ratios between implementations come from :func:`interleaved_times`: the contenders run in
rounds, one call each per round, so a slow stretch of the machine (this 2-core VM drifts by up
to 2x between runs) hits all of them alike, and each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Interleaved", "copy_time", "interleaved_times", "median_time"]

MIN_RUNS = 15
# A timed sample of a fast call repeats it until the sample lasts at least this long (timer
# and scheduler granularity would otherwise dominate microsecond calls).
MIN_SAMPLE_S = 200e-6


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


@dataclass(frozen=True)
class Interleaved:
    """Per-round times (seconds per call) of named contenders measured in the same rounds."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of ``time[num] / time[den]`` (drift cancels within a round)."""
        return statistics.median(a / b for a, b in zip(self.times[num], self.times[den], strict=True))


def interleaved_times(fns: Mapping[str, Callable[[], object]], runs: int = MIN_RUNS, warmup: int = 3) -> Interleaved:
    """Time every callable in ``runs`` rounds; each round calls each one, in rotating order.

    Calls faster than ``MIN_SAMPLE_S`` are repeated within a sample (the same count in every
    round, fixed after warm-up) and reported per call. ``runs`` below 15 is raised to 15.
    """
    runs = max(int(runs), MIN_RUNS)
    names = list(fns)
    reps = {}
    for name in names:
        fn = fns[name]
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        reps[name] = max(1, min(1000, int(MIN_SAMPLE_S / max(t, 1e-9)) + 1)) if t < MIN_SAMPLE_S else 1
    times: dict[str, list[float]] = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(runs):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                fn, k = fns[name], reps[name]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                times[name].append((time.perf_counter() - t0) / k)
    finally:
        if was_enabled:
            gc.enable()
    return Interleaved(times)
