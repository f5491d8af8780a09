"""Cold start: time the first bnkit call and list the numba dispatchers it compiles.

Run with an empty cache to see a first call on a new machine, e.g.::

    NUMBA_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python benchmarks/cold_start.py float32 [--all]

It times a ``bnkit.nn.BatchNorm2d`` training forward + backward on a (16, 16, 8, 8) input of the given
dtype (default float32) and prints every top-level compile (a dispatcher compiled, or loaded from the
cache, for a new signature outside any other compile) with its time, slowest first. With ``--all`` it runs
``bnkit warmup`` for that dtype in this process instead (every path) and prints each function's own
compile time (its nested compiles of other dispatchers left out), summed over its signatures: where the
time of compiling everything goes.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

t0 = time.perf_counter()
from numba.core import dispatcher  # noqa: E402

records: list[tuple[int, float, str]] = []  # (depth, time, name) of every compile call
own: Counter = Counter()  # name -> time spent in its compiles minus the nested ones
_nested: list[float] = []  # per open compile: the time of the compiles nested in it so far
_compile = dispatcher.Dispatcher.compile


def _timed_compile(self, sig):
    _nested.append(0.0)
    t = time.perf_counter()
    try:
        return _compile(self, sig)
    finally:
        spent = time.perf_counter() - t
        inner = _nested.pop()
        if _nested:
            _nested[-1] += spent
        name = f"{self.py_func.__module__.rpartition('.')[2]}.{self.py_func.__name__}"
        records.append((len(_nested), spent, name))
        own[name] += spent - inner


dispatcher.Dispatcher.compile = _timed_compile

import torch  # noqa: E402

import bnkit  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--all"]
    dtype = getattr(torch, args[0] if args else "float32")
    if "--all" in sys.argv[1:]:
        from bnkit.utils.warmup import warmup

        t1 = time.perf_counter()
        report = warmup([dtype], jobs=1)
        print(f"import {t1 - t0:.1f} s, bnkit warmup {report.seconds:.1f} s ({report.steps} steps, {dtype}, "
              "one process)")
        print(f"compile time by function (own time, nested compiles left out): {sum(own.values()):.1f} s in all")
        for n, t in own.most_common(30):
            print(f"  {t:6.2f} s  {n}")
        return
    t1 = time.perf_counter()
    m = bnkit.nn.BatchNorm2d(16).to(dtype)
    x = torch.randn(16, 16, 8, 8, dtype=dtype, requires_grad=True)
    m(x).sum().backward()
    t2 = time.perf_counter()
    print(f"import {t1 - t0:.1f} s, first training forward + backward {t2 - t1:.1f} s "
          f"({dtype}, torch threads {torch.get_num_threads()})")
    top = sorted(((t, n) for d, t, n in records if d == 0), reverse=True)
    print(f"top-level compiles: {len(top)}, {sum(t for t, _ in top):.1f} s in all")
    for t, n in top:
        print(f"  {t:6.2f} s  {n}")
    nested = Counter(n for _, _, n in records)
    print(f"compile calls, nested included: {sum(nested.values())} over {len(nested)} functions")


if __name__ == "__main__":
    main()
