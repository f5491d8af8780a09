"""Cold start: time the first bnkit call and list the numba dispatchers it compiles.

Run with an empty cache to see a first call on a new machine, e.g.::

    NUMBA_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python benchmarks/cold_start.py float32

It times a ``bnkit.nn.BatchNorm2d`` training forward + backward on a (16, 16, 8, 8) input of the given
dtype (default float32) and prints every top-level compile (a dispatcher compiled, or loaded from the
cache, for a new signature outside any other compile) with its time, slowest first.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

t0 = time.perf_counter()
from numba.core import dispatcher  # noqa: E402

records: list[tuple[int, float, str]] = []
_depth = [0]
_compile = dispatcher.Dispatcher.compile


def _timed_compile(self, sig):
    _depth[0] += 1
    t = time.perf_counter()
    try:
        return _compile(self, sig)
    finally:
        _depth[0] -= 1
        name = f"{self.py_func.__module__.rpartition('.')[2]}.{self.py_func.__name__}"
        records.append((_depth[0], time.perf_counter() - t, name))


dispatcher.Dispatcher.compile = _timed_compile

import torch  # noqa: E402

import bnkit  # noqa: E402


def main() -> None:
    t1 = time.perf_counter()
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
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
