"""Benchmarks as code: timing utilities (:mod:`bnkit.bench.timing`) and the CPU case table
(:mod:`bnkit.bench.cpu`, entry point ``bnkit.bench.cpu.main(argv)``).

Benchmarks are scripts, not tests: nothing here runs at import time.
"""

__all__ = ["cpu", "timing"]
