"""Gradient accuracy on offset data: bnkit's backward paths and torch's, against float64.

For each path (the small path's kernels, the regular ``cpu`` backend, fused BN + activation in
standard and memory-saving mode, the reference backend), mode and kind of offset data
(``x ~ 1000 + N(0, 1)``, ``3 + 0.01 N(0, 1)``; float32, small tensors), prints the largest error
of ``dx``, ``dw``, ``db`` against torch's batch norm in float64 on the same float32 inputs, for
bnkit and for torch's float32 batch norm, relative to the largest float64 value, and their ratio.

    PYTHONPATH=src python benchmarks/grad_accuracy.py [--trials 5]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch
import torch.nn.functional as F

import bnkit.functional as BF
from bnkit.kernels import forced_road, use_backend

SHAPES = [(4, 3), (8, 4, 5), (2, 3, 4, 4), (16, 8, 3, 3), (64, 16, 7, 7), (256, 64)]
OFFSETS = [(1000.0, 1.0), (3.0, 0.01)]


PATHS = {
    "small kernels": (contextlib.nullcontext, BF.batch_norm, {}),
    "cpu backend": (lambda: forced_road("checked"), BF.batch_norm, {}),
    "fused act": (contextlib.nullcontext, BF.batch_norm_act, {"activation": "identity"}),
    "fused act (memory saving)": (contextlib.nullcontext, BF.batch_norm_act,
                                  {"activation": "identity", "memory_saving": True}),
    "reference": (lambda: use_backend("reference"), BF.batch_norm, {}),
}


def grads(fn, x, w, b, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def bound(bn, rm, rv, training, **kwargs):
    # bn(x, w, b) with copies of the running statistics in x's dtype (momentum 0: nothing moves)
    def call(x, w, b):
        return bn(x, rm.to(x.dtype, copy=True), rv.to(x.dtype, copy=True), w, b, training, 0.0, 1e-5, **kwargs)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'path':27s} {'mode':5s} {'data':15s} " + "  ".join(f"{g:>24s}" for g in ("dx bnkit/torch", "dw", "db")))
    for (name, (context, fn, kwargs)), training, (offset, scale) in itertools.product(
        PATHS.items(), (True, False), OFFSETS
    ):
        worst = [[0.0, 0.0] for _ in range(3)]
        for shape, _ in itertools.product(SHAPES, range(args.trials)):
            c = shape[1]
            x = (offset + scale * torch.randn(shape, dtype=torch.float64)).float()
            w, b, dy = torch.randn(c), torch.randn(c), torch.randn(shape)
            rm = (offset + scale * torch.randn(c, dtype=torch.float64)).float()
            rv = (scale**2 * (torch.rand(c, dtype=torch.float64) + 0.5)).float()
            state = (rm, rv, training)
            exact = grads(bound(F.batch_norm, *state), x.double(), w.double(), b.double(), dy.double())
            theirs = grads(bound(F.batch_norm, *state), x, w, b, dy)
            with context():
                ours = grads(bound(fn, *state, **kwargs), x, w, b, dy)
            for i, (o, t, e) in enumerate(zip(ours, theirs, exact, strict=True)):
                size = e.abs().max().item()
                worst[i][0] = max(worst[i][0], (o.double() - e).abs().max().item() / size)
                worst[i][1] = max(worst[i][1], (t.double() - e).abs().max().item() / size)
        cells = [f"{o:.1e}/{t:.1e} ({o / t if t else float('nan'):4.1f}x)" for o, t in worst]
        mode = "train" if training else "eval"
        print(f"{name:27s} {mode:5s} {f'{offset:g}+{scale:g}N':15s} " + "  ".join(f"{cell:>24s}" for cell in cells))


if __name__ == "__main__":
    main()
