"""End-to-end training step: torch's batch norm against bnkit's, eager and under torch.compile, interleaved.

Two networks: the CPU benchmark's ResNet-style CNN (``bnkit.bench.cpu._resnet``) and a MobileNet-style CNN
of depthwise-separable blocks (conv-BN-ReLU, where batch norm is a larger share of the step). Each step is
forward, cross-entropy, backward and an SGD update on a fixed batch. The contenders of one network share
their initial weights; bnkit's are ``bnkit.convert`` of torch's (``fuse_activations=True`` for "fused").
Ratios are medians of per-round ratios against torch eager (or torch compiled), measured in the same run.

    PYTHONPATH=src python benchmarks/bench_e2e.py [--runs 15] [--threads 2] [--no-compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bnkit
from bnkit.bench.cpu import _resnet
from bnkit.bench.timing import interleaved_times


def mobilenet(width: int = 32, classes: int = 10) -> nn.Module:
    """A MobileNetV1-style CNN: a stem, then depthwise 3x3 + pointwise 1x1 pairs, each conv-BN-ReLU."""

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    layers = conv_bn(3, width, 3, 1)
    cin = width
    for cout, stride in ((2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2), (8 * width, 1)):
        layers += conv_bn(cin, cin, 3, stride, groups=cin) + conv_bn(cin, cout, 1, 1)
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def stepper(net: nn.Module, x: torch.Tensor, target: torch.Tensor, compile_it: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(net) if compile_it else net

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), target).backward()
        opt.step()

    return step


def measure(name: str, make: Callable[[], nn.Module], runs: int, compile_too: bool) -> list[dict]:
    torch.manual_seed(0)
    model = make()
    x, target = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    steps = {
        "torch eager": stepper(model, x, target, False),
        "bnkit eager": stepper(bnkit.convert(copy.deepcopy(model)), x, target, False),
        "bnkit eager fused": stepper(bnkit.convert(copy.deepcopy(model), fuse_activations=True), x, target, False),
    }
    if compile_too:
        steps["torch compiled"] = stepper(copy.deepcopy(model), x, target, True)
        steps["bnkit compiled"] = stepper(bnkit.convert(copy.deepcopy(model)), x, target, True)
    for step in steps.values():  # compiles (numba kernels, inductor graphs) before timing
        step()
        step()
    t = interleaved_times(steps, runs=runs, same_calls=tuple(steps))
    rows = []
    for contender in steps:
        base = "torch compiled" if contender.endswith("compiled") else "torch eager"
        rows.append({"network": name, "contender": contender, "ms": round(t.median(contender) * 1e3, 2),
                     "vs": base, "speed": round(t.ratio(base, contender), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for name, make in (("ResNet-style", lambda: _resnet(32)), ("MobileNet-style", mobilenet)):
        rows += measure(name, make, args.runs, not args.no_compile)
    print(f"batch 32x3x32x32, {args.threads} thread(s), {args.runs} interleaved rounds, "
          f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s")
    print(f"{'network':16s} {'contender':18s} {'ms/step':>9s}  speed")
    for r in rows:
        print(f"{r['network']:16s} {r['contender']:18s} {r['ms']:9.2f}  {r['speed']:.3f}x {r['vs']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "runs": args.runs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
