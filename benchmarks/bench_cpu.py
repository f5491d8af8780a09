"""CPU benchmark: bnkit's numba backend vs torch's native batch norm (see ``bnkit.bench.cpu``).

    PYTHONPATH=src python benchmarks/bench_cpu.py [--quick] [--runs 15] [--out benchmarks/results]
"""

import sys

from bnkit.bench.cpu import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
