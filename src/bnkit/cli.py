"""The ``bnkit`` command (sub-commands are filled in by the CLI work)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    import bnkit

    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
    )
    twin = bnkit.convert(__import__("copy").deepcopy(model))
    opt_t = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.1)
    worst = 0.0
    for _ in range(args.steps):
        x = torch.randn(16, 1, 8, 8)
        target = torch.randint(0, 4, (16,))
        for net, opt in ((model, opt_t), (twin, opt_b)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), target)
            loss.backward()
            opt.step()
            net.last_loss = loss.item()
        worst = max(worst, abs(model.last_loss - twin.last_loss))
    print(f"trained {args.steps} steps: largest loss difference torch vs bnkit = {worst:.3g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bnkit", description="batch normalization from first principles")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN with bnkit next to torch")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
