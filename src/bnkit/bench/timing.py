"""Timing utilities shared by the benchmarks.

Rules (STYLE.md, rule 9): medians of many runs after warm-up, and every time reported next to
the time of copying the same tensor (``x.clone()``, which keeps the memory format), the
memory-bandwidth yardstick: a batch norm that reads ``x`` once and writes ``y`` once cannot
beat ~1x copy.

:func:`interleaved_times` runs the contenders (say torch, bnkit and the copy) in rounds, one
sample of each per round, so a slow stretch of the machine (this 2-core VM drifts by up to 2x
between runs) hits all of them alike, and a ratio is the median of per-round ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

__all__ = ["Interleaved", "interleaved_times"]

MIN_RUNS = 15
# A timed sample of a fast call repeats it until the sample lasts at least this long (timer
# and scheduler granularity would otherwise dominate microsecond calls).
MIN_SAMPLE_S = 200e-6


@dataclass(frozen=True)
class Interleaved:
    """Per-round times (seconds per call) of named contenders measured in the same rounds."""

    times: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratios(self, num: str, den: str) -> list[float]:
        """``time[num] / time[den]`` round by round (drift cancels within a round)."""
        return [a / b for a, b in zip(self.times[num], self.times[den], strict=True)]

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of ``time[num] / time[den]``."""
        return statistics.median(self.ratios(num, den))


def interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    runs: int = MIN_RUNS,
    warmup: int = 3,
    *,
    calls: int | None = None,
    clock: Callable[[], float] | None = None,
    same_calls: Collection[str] = (),
) -> Interleaved:
    """Time every callable in ``runs`` rounds; each round takes one sample of each, in rotating order.

    A sample is ``calls`` calls, reported per call; by default calls faster than
    ``MIN_SAMPLE_S`` are repeated (the same count in every round, fixed after warm-up) and
    slower ones are timed one by one. ``clock`` is ``time.perf_counter`` by default
    (``time.thread_time`` is steadier on a busy machine where everything runs on the calling
    thread). ``runs`` below 15 is raised to 15.

    ``same_calls`` names contenders that take one common count, the largest any of them needs: two
    implementations compared by a ratio then get the same mix of a first call (its caches cold from the
    other contenders') and repeats. Without it, a 134 us call got two calls per sample (the second
    warm) where a 211 us one got a single cold call.
    """
    clock = clock or time.perf_counter
    runs = max(int(runs), MIN_RUNS)
    names = list(fns)
    reps = {}
    for name in names:
        fn = fns[name]
        for _ in range(max(1, warmup)):
            t0 = clock()
            fn()
            t = clock() - t0
        if calls is not None:
            reps[name] = max(1, int(calls))
        else:
            reps[name] = max(1, min(1000, int(MIN_SAMPLE_S / max(t, 1e-9)) + 1)) if t < MIN_SAMPLE_S else 1
    unknown = [name for name in same_calls if name not in fns]
    if unknown:
        raise ValueError(f"same_calls names no contender: {unknown}")
    if same_calls:
        shared = max(reps[name] for name in same_calls)
        for name in same_calls:
            reps[name] = shared
    times: dict[str, list[float]] = {name: [] for name in names}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(runs):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                fn, k = fns[name], reps[name]
                t0 = clock()
                for _ in range(k):
                    fn()
                times[name].append((clock() - t0) / k)
    finally:
        if was_enabled:
            gc.enable()
    return Interleaved(times)
