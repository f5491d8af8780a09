"""SyncBatchNorm vs local batch norm on 2 processes (gloo, CPU): bytes per layer and time per step.

    PYTHONPATH=src python benchmarks/bench_sync.py             # C in 16, 64, 256; float32
    PYTHONPATH=src python benchmarks/bench_sync.py --quick     # one small size, few repeats, no files

For each layer width C it measures, on every process, one training step (forward +
backward) of a single layer on a (N, C, H, W) local batch:

* ``local``: ``bnkit.nn.BatchNorm2d`` (no communication, statistics of the local batch);
* ``sync``:  ``bnkit.nn.SyncBatchNorm`` (statistics of the global batch).

Bytes are counted by wrapping ``torch.distributed`` collectives during the timed steps
(payload of the collective per process: the gathered tensor for all_gather, the reduced
tensor for all_reduce). torch's scheme cannot run here (its SyncBatchNorm refuses CPU
tensors), so its bytes are computed from its source: forward all_gather of
``cat([mean, invstd, count])`` (2C + 1 values) from every process, backward all_reduce of
``cat([sum_dy, sum_dy_xmu])`` (2C values). bnkit gathers ``[n_hi, n_lo, mean, M2]``
(2C + 2 values: the count split in two so it stays exact in float32) and reduces
``cat([sum_dy, sum_dy_xhat])`` (2C values). Results go to benchmarks/results/sync.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnkit

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2


def torch_scheme_bytes(c: int, world: int, itemsize: int) -> tuple[int, int]:
    """(forward, backward) payload bytes per process of torch.nn.SyncBatchNorm's collectives."""
    return world * (2 * c + 1) * itemsize, 2 * c * itemsize


class ByteCounter:
    """Count collective calls and payload bytes while active (wraps torch.distributed functions)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._saved: dict[str, object] = {}

    def __enter__(self) -> ByteCounter:
        for name in ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce"):
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                first = args[0]
                tensors = first if isinstance(first, list) else [first]
                self.calls[_name] = self.calls.get(_name, 0) + 1
                self.bytes[_name] = self.bytes.get(_name, 0) + sum(t.numel() * t.element_size() for t in tensors)
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _step(layer: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    x.grad = None
    layer(x).backward(gy)


def _measure(layer, x, gy, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        _step(layer, x, gy)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(layer, x, gy)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    dtype = getattr(torch, args.dtype)
    rows = []
    for c in args.channels:
        shape = (args.batch, c, args.hw, args.hw)
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(True)
        gy = torch.randn(shape, generator=gen, dtype=dtype)
        local = bnkit.nn.BatchNorm2d(c, dtype=dtype)
        sync = bnkit.nn.SyncBatchNorm(c, dtype=dtype)
        t_local = _measure(local, x, gy, args.warmup, args.repeats)
        backend = bnkit.last_backend()
        dist.barrier()
        t_sync = _measure(sync, x, gy, args.warmup, args.repeats)
        with ByteCounter() as counter:
            _step(sync, x, gy)
        itemsize = torch.empty((), dtype=bnkit.reference.stats_dtype(dtype)).element_size()
        torch_fwd, torch_bwd = torch_scheme_bytes(c, WORLD, itemsize)
        fwd = sum(b for name, b in counter.bytes.items() if name.startswith("all_gather"))
        rows.append({
            "C": c, "local_shape": list(shape), "dtype": args.dtype, "world": WORLD, "backend": backend,
            "collectives_per_step": sum(counter.calls.values()),
            "bnkit_fwd_bytes": fwd, "bnkit_bwd_bytes": counter.bytes.get("all_reduce", 0),
            "torch_fwd_bytes": torch_fwd, "torch_bwd_bytes": torch_bwd,
            "local_ms": t_local * 1e3, "sync_ms": t_sync * 1e3, "sync_over_local": t_sync / t_local,
        })
        dist.barrier()
    if rank == 0:
        _report(rows, args)
    dist.destroy_process_group()


def _report(rows: list[dict], args: argparse.Namespace) -> None:
    head = (f"{'C':>5} {'local shape':>18} {'coll/step':>9} {'bnkit fwd B':>11} {'bnkit bwd B':>11} "
            f"{'torch fwd B':>11} {'torch bwd B':>11} {'local ms':>9} {'sync ms':>9} {'sync/local':>10}")
    print(f"bnkit SyncBatchNorm vs local BN, {WORLD} processes, gloo on CPU, {args.dtype}, "
          f"median of {args.repeats} steps (forward + backward); backend {rows[0]['backend']}")
    print(head)
    for r in rows:
        print(f"{r['C']:>5} {str(tuple(r['local_shape'])):>18} {r['collectives_per_step']:>9} "
              f"{r['bnkit_fwd_bytes']:>11} {r['bnkit_bwd_bytes']:>11} {r['torch_fwd_bytes']:>11} "
              f"{r['torch_bwd_bytes']:>11} {r['local_ms']:>9.3f} {r['sync_ms']:>9.3f} {r['sync_over_local']:>10.2f}")
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_process": 1,
            "repeats": args.repeats, "warmup": args.warmup}
    (RESULTS / "sync.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(RESULTS / "sync.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "local_shape": "x".join(map(str, r["local_shape"]))})
    print(f"wrote {RESULTS / 'sync.json'} and {RESULTS / 'sync.csv'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--batch", type=int, default=8, help="local batch size per process")
    parser.add_argument("--hw", type=int, default=16, help="spatial size H = W")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small size, few repeats; writes no results")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.repeats, args.warmup = [16], 5, 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, args), nprocs=WORLD, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
