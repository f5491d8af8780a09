"""torch.compile training step: torch's batch norm vs bnkit's three possible lowerings, interleaved in one run.

``bnkit`` is what bnkit gives inductor (``bnkit.autograd.inductor_train``: statistics by ``var_mean`` in the
computation dtype and the hand-derived backward, fusable with their neighbours); ``bnkit_ref`` forces
bnkit.reference's formulas (float64 accumulation, autograd's backward of the formulas) by making
``bnkit.autograd.inductor_records`` answer False during its steps; ``bnkit_ops`` forces bnkit's custom
ops (opaque calls into the numba kernels) by making ``bnkit.autograd.needs_plain_ops`` answer False.
The model is the CPU benchmark's ResNet-style CNN or ``bench_e2e``'s MobileNet-style CNN (batch
32x3x32x32, width 32), one SGD step per call. Usage::

    PYTHONPATH=src python benchmarks/bench_compile.py [--runs 21] [--threads 1] [--network resnet|mobilenet]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bnkit
import bnkit.autograd as bnkit_autograd
from bnkit.bench.cpu import _resnet
from bnkit.bench.timing import interleaved_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--network", choices=("resnet", "mobilenet"), default="resnet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.network == "resnet":
        model = _resnet(32)
    else:
        from bench_e2e import mobilenet

        model = mobilenet()
    x, target = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    plain_ops = bnkit_autograd.needs_plain_ops
    inductor_records = bnkit_autograd.inductor_records

    def never() -> bool:  # one function object, so dynamo's guards on it hold between steps
        return False

    def stepper(net: torch.nn.Module, custom_ops: bool = False, formulas: bool = False) -> Callable[[], None]:
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        compiled = torch.compile(net, fullgraph=True)

        def step() -> None:
            if custom_ops:
                bnkit_autograd.needs_plain_ops = never
            if custom_ops or formulas:
                bnkit_autograd.inductor_records = never
            try:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(compiled(x), target).backward()
                opt.step()
            finally:
                bnkit_autograd.needs_plain_ops = plain_ops
                bnkit_autograd.inductor_records = inductor_records

        return step

    steps = {
        "torch": stepper(model),
        "bnkit": stepper(bnkit.convert(copy.deepcopy(model))),
        "bnkit_ref": stepper(bnkit.convert(copy.deepcopy(model)), formulas=True),
        "bnkit_ops": stepper(bnkit.convert(copy.deepcopy(model)), custom_ops=True),
    }
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        step()
        print(f"{name}: first two steps (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    t = interleaved_times(steps, runs=args.runs)
    print(f"{args.network}, threads {args.threads}, {args.runs} interleaved rounds")
    for name in steps:
        print(f"{name:10s} {t.median(name) * 1e3:9.2f} ms   speed vs torch.compile(torch model) "
              f"{t.ratio('torch', name):.3f}x")


if __name__ == "__main__":
    main()
