"""Train a small CNN with bnkit's SyncBatchNorm under DistributedDataParallel, on CPU.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # gloo on CPU, a few seconds
    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 20

Each process sees a different, deliberately uneven slice of every batch; the batch-norm
statistics are nevertheless those of the whole batch (bnkit.nn.SyncBatchNorm), so the
running statistics come out identical on every process. With CUDA and NCCL the same
script works unchanged (``--backend nccl``; one GPU per process).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import bnkit


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="global batch size per step")
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    args = parser.parse_args()

    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else None
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = bnkit.convert(make_model(), sync=True).to(device)  # every BatchNorm2d -> bnkit.nn.SyncBatchNorm
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    data = torch.Generator().manual_seed(1)  # the same global batches on every process
    # Uneven split: rank r gets a share proportional to r + 1 (exact statistics regardless).
    shares = [r + 1 for r in range(world)]
    bounds = [args.batch * sum(shares[:r]) // sum(shares) for r in range(world + 1)]
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, 16, 16, generator=data)
        t = torch.randint(0, 10, (args.batch,), generator=data)
        xs, ts = x[bounds[rank] : bounds[rank + 1]].to(device), t[bounds[rank] : bounds[rank + 1]].to(device)
        # Sum of per-sample losses / global batch: DDP averages gradients, so scale by world.
        loss = nn.functional.cross_entropy(ddp(xs), ts, reduction="sum") * world / args.batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach() / world
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item():.4f}")

    bn = model[1]
    stats = torch.cat([bn.running_mean, bn.running_var])
    every = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(every, stats)
    if rank == 0:
        same = all(torch.equal(s, every[0]) for s in every)
        print(f"{type(bn).__name__} layers: {sum(isinstance(m, bnkit.nn.SyncBatchNorm) for m in model.modules())}")
        print(f"running stats identical on every process: {same}")
    # Leave together, and drop DDP (its reducer holds gloo's work objects and their tensors) while the
    # interpreter is alive: a rank that tears gloo down while a peer is still sending, or whose work
    # objects die during interpreter finalization, aborts ("terminate called without an active exception").
    del ddp, opt, loss
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
