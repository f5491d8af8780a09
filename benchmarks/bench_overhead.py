"""Per-call overhead on tiny inputs: bnkit vs torch's native batch norm, interleaved.

On small tensors the kernels take a few microseconds and the rest of a call is Python
(argument checks, autograd, dispatch, launcher). This script measures the whole call, as a
user makes it, for the functional API and for ``bnkit.nn.BatchNorm2d``:

* each round times one batch of ``--calls`` torch calls and one of bnkit calls, in alternating order
  (interleaved, so a slow phase of a noisy machine hits both sides alike);
* the per-call time is the median over ``--rounds`` rounds of (batch time / calls);
* ``ratio`` = bnkit / torch, taken from the same rounds.

    PYTHONPATH=src python benchmarks/bench_overhead.py [--rounds 40] [--calls 50] [--backend cpu]
        [--clock wall|thread] [--json out.json]

Modes (grad mode on, weight and bias requiring grad, as in a model): ``train`` (training
forward, running statistics updated), ``eval`` (eval forward) and ``train_fb`` (training
forward + backward through ``autograd.grad``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as tF

import bnkit.functional as bF
import bnkit.nn as bnn
from bnkit.bench.timing import interleaved_times
from bnkit.kernels import use_backend

SHAPES = [(16, 16, 8, 8), (4, 8, 4, 4, 4), (64, 32)]
MODES = ("train", "eval", "train_fb")


def _functional_case(bn: Callable, shape: tuple[int, ...], mode: str) -> Callable[[], object]:
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape)
    rm, rv = torch.zeros(c), torch.ones(c)
    w = torch.randn(c).requires_grad_()
    b = torch.randn(c).requires_grad_()
    if mode == "eval":
        return lambda: bn(x, rm, rv, w, b, training=False)
    if mode == "train":
        return lambda: bn(x, rm, rv, w, b, training=True, momentum=0.1)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape)

    def step():
        y = bn(xg, rm, rv, w, b, training=True, momentum=0.1)
        return torch.autograd.grad(y, (xg, w, b), g)

    return step


def _module_case(cls: type, mode: str) -> Callable[[], object]:
    torch.manual_seed(0)
    shape = (16, 16, 8, 8)
    m = cls(16)
    x = torch.randn(shape)
    if mode == "eval":
        m.eval()
        return lambda: m(x)
    if mode == "train":
        return lambda: m(x)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape)
    params = (xg, m.weight, m.bias)

    def step():
        return torch.autograd.grad(m(xg), params, g)

    return step


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def measure(torch_fn: Callable[[], object], bnkit_fn: Callable[[], object], rounds: int, calls: int,
            clock: Callable[[], float] = time.perf_counter):
    """Median per-call seconds of each side and of their ratio, torch and bnkit interleaved."""
    # warm-up as three samples' worth of calls: compile, caches, allocator
    t = interleaved_times({"torch": torch_fn, "bnkit": bnkit_fn}, runs=rounds, warmup=3 * calls, calls=calls,
                          clock=clock)
    return t.median("torch"), t.median("bnkit"), t.ratio("bnkit", "torch")


def cases():
    for shape in SHAPES:
        for mode in MODES:
            yield f"F {shape}", mode, _functional_case(tF.batch_norm, shape, mode), _functional_case(
                bF.batch_norm, shape, mode)
    for mode in MODES:
        yield "BatchNorm2d (16,16,8,8)", mode, _module_case(torch.nn.BatchNorm2d, mode), _module_case(
            bnn.BatchNorm2d, mode)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--backend", default="cpu", help="bnkit backend (reference|cpu|auto)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time, or CPU time of the calling thread (steadier on a busy machine; misses work "
                        "done on other threads, so use it only where both sides run single-threaded, as here)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bnkit backend {args.backend}, "
          f"median of {args.rounds} rounds x {args.calls} calls, {args.clock} clock")
    print(f"{'case':28s} {'mode':9s} {'torch ms':>9s} {'bnkit ms':>9s} {'ratio':>6s}")
    with use_backend(args.backend):
        for name, mode, torch_fn, bnkit_fn in cases():
            t, b, r = measure(torch_fn, bnkit_fn, args.rounds, args.calls, CLOCKS[args.clock])
            rows.append({"case": name, "mode": mode, "torch_ms": t * 1e3, "bnkit_ms": b * 1e3, "ratio": r})
            print(f"{name:28s} {mode:9s} {t * 1e3:9.4f} {b * 1e3:9.4f} {r:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
