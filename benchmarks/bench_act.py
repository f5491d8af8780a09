"""Fused batch norm + activation against the unfused pair, eager training, interleaved.

``bnkit.nn.BatchNormAct2d`` (standard or memory-saving) against ``bnkit.nn.BatchNorm2d`` followed by torch's
in-place activation (what ``bnkit.convert`` without ``fuse_activations`` leaves of a conv-BN-ReLU block), in
training mode (memory saving only with leaky_relu, which it can invert) with an input and parameters that
require gradients. "forward" times the recorded forward, "full" the forward and the backward of a fixed
output gradient. Each ratio (fused time / unfused time, below
1 means the fused layer is faster) is the median of per-round ratios measured in the same rounds.

Shapes: the batch-norm inputs of benchmarks/bench_e2e.py's networks (batch 32x3x32x32, width 32: ResNet-style
32x32x32, 64x16x16, 128x8x8; MobileNet-style also 64x32x32, 128x16x16, 256x8x8) and a large 64x256x14x14.

    PYTHONPATH=src python benchmarks/bench_act.py [--runs 15] [--threads 2] [--shapes 32,64,16,16 ...]
        [--activations relu leaky_relu] [--modes standard memory_saving] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import bnkit
from bnkit.bench.timing import interleaved_times

SHAPES = ((32, 32, 32, 32), (32, 64, 32, 32), (32, 64, 16, 16), (32, 128, 16, 16), (32, 128, 8, 8),
          (32, 256, 8, 8), (64, 256, 14, 14))  # fmt: skip


def contenders(shape: tuple[int, ...], activation: str, memory_saving: bool) -> dict:
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape).requires_grad_()
    gz = torch.randn(shape)
    fused = bnkit.nn.BatchNormAct2d(c, activation=activation, memory_saving=memory_saving).train()
    bn = bnkit.nn.BatchNorm2d(c).train()
    for m in (fused, bn):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)

    def pair(t):
        y = bn(t)
        return F.relu_(y) if activation == "relu" else F.leaky_relu_(y, 0.01)

    def forward(f):
        return lambda: f(x)

    def full(f):
        def step():
            f(x).backward(gz)
            x.grad = None
        return step

    return {"forward": {"fused": forward(fused), "unfused": forward(pair)},
            "full": {"fused": full(fused), "unfused": full(pair)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="*", default=None, help="N,C,H,W ...")
    parser.add_argument("--activations", nargs="*", default=["relu", "leaky_relu"])
    parser.add_argument("--modes", nargs="*", default=["standard", "memory_saving"])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    t0 = time.perf_counter()
    rows = []
    print(f"{'shape':16s} {'activation':10s} {'mode':13s} {'forward':>8s} {'full':>8s}   (fused / unfused)")
    for shape in shapes:
        for act in args.activations:
            for mode in args.modes:
                if mode == "memory_saving" and act == "relu":
                    continue  # relu cannot be inverted: memory saving takes leaky_relu
                row = {"shape": list(shape), "activation": act, "mode": mode}
                for direction, fns in contenders(shape, act, mode == "memory_saving").items():
                    t = interleaved_times(fns, runs=args.runs, same_calls=tuple(fns))
                    row[direction] = round(t.ratio("fused", "unfused"), 3)
                    row[direction + "_us"] = [round(t.median(k) * 1e6, 1) for k in ("fused", "unfused")]
                rows.append(row)
                print(f"{'x'.join(map(str, shape)):16s} {act:10s} {mode:13s} {row['forward']:8.3f} {row['full']:8.3f}",
                      flush=True)
    worst = max(max(r["forward"], r["full"]) for r in rows)
    geo = statistics.geometric_mean([r[d] for r in rows for d in ("forward", "full")])
    print(f"worst {worst:.3f}, geometric mean {geo:.3f}; {args.threads} thread(s), {args.runs} rounds, "
          f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "runs": args.runs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
