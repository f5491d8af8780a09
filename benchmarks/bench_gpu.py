"""GPU benchmark: torch's native batch norm (cuDNN where torch uses it) vs bnkit's Triton backend.

Usage (on a machine with a CUDA GPU and triton installed)::

    PYTHONPATH=src python benchmarks/bench_gpu.py               # every shape, writes benchmarks/results/
    PYTHONPATH=src python benchmarks/bench_gpu.py --quick       # fewer repetitions, a few shapes
    PYTHONPATH=src python benchmarks/bench_gpu.py --only nchw --modes train_fwd --dtypes float32,bfloat16

What is measured, per shape x mode x provider:

* time: median over ``--rep`` runs after ``--warmup`` runs, each run timed by a pair of CUDA
  events; by default a 256 MiB buffer is overwritten before every run so nothing is served from
  L2 (``--no-flush`` keeps the cache warm; with the flush, host launch overhead is mostly hidden);
* GB/s counting the minimum traffic of the mode, in multiples of the tensor's size ``B``:
  training forward 2 reads + 1 write (3B), eval forward 1 read + 1 write (2B), forward+backward
  3B + 4 reads + 1 write (8B);
* ``%copy``: that bandwidth as a percentage of the device-to-device copy bandwidth of the same
  tensor (``y.copy_(x)``, 2B), measured in the same run and the same way; and ``xcopy``: time
  over the time of one copy of the tensor;
* the number of GPU kernels one call launches (torch profiler), unless ``--no-launches``.

Before timing, every case checks that bnkit really ran the Triton backend and matches torch.
Results go to ``benchmarks/results/bench_gpu.json`` and ``.csv`` together with the device, the
versions and a large-buffer copy bandwidth. Without CUDA the script exits with a message.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("train_fwd", "eval_fwd", "train_fwd_bwd")
TRAFFIC = {"train_fwd": 3, "eval_fwd": 2, "train_fwd_bwd": 8}  # minimum bytes moved, in tensor sizes
PROVIDERS = ("torch", "bnkit")
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    layout: str  # "contiguous" or "channels_last" (channels_last_3d for 5-D)
    dtype: str | None = None  # None: every --dtypes entry; otherwise fixed

    def make(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        x = torch.randn(self.shape, device=device, dtype=torch.float32).mul_(2).add_(0.5).to(dtype)
        if self.layout == "channels_last":
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        return x


# The CPU benchmark's shapes, then the large GPU ones of the issue.
CASES = [
    Case("resnet_stem", (32, 64, 56, 56), "contiguous"),
    Case("resnet_mid", (64, 256, 14, 14), "contiguous"),
    Case("resnet_late", (256, 512, 7, 7), "contiguous"),
    Case("big_spatial", (8, 32, 128, 128), "contiguous"),
    Case("resnet_stem_cl", (32, 64, 56, 56), "channels_last"),
    Case("resnet_mid_cl", (64, 256, 14, 14), "channels_last"),
    Case("bn1d", (4096, 1024), "contiguous"),
    Case("bn1d_seq", (64, 128, 1000), "contiguous"),
    Case("tiny", (16, 16, 8, 8), "contiguous"),
    Case("bn3d", (4, 8, 4, 4, 4), "contiguous"),
    Case("large_bf16_cl", (256, 256, 56, 56), "channels_last", dtype="bfloat16"),
    Case("large_224", (32, 64, 224, 224), "contiguous"),
]
QUICK = ("resnet_stem", "resnet_stem_cl", "bn1d", "tiny")


@dataclass
class Row:
    case: str
    shape: str
    layout: str
    dtype: str
    mode: str
    bytes_per_tensor: int
    copy_ms: float
    torch_ms: float
    bnkit_ms: float
    speedup: float  # torch_ms / bnkit_ms: > 1 means bnkit is faster
    torch_gbps: float
    bnkit_gbps: float
    torch_pct_copy: float
    bnkit_pct_copy: float
    bnkit_x_copy: float  # bnkit time over the time of one copy of the tensor
    torch_launches: int | None = None
    bnkit_launches: int | None = None


class Timer:
    """Median CUDA-event time of ``fn`` in milliseconds, optionally flushing L2 before each run."""

    def __init__(self, warmup: int, rep: int, flush: bool, device: torch.device) -> None:
        self.warmup, self.rep = warmup, rep
        self.flush_buf = torch.empty(256 << 20, dtype=torch.int8, device=device) if flush else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.rep)]
        for start, end in zip(starts, ends, strict=True):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def count_launches(fn: Callable[[], object]) -> int | None:
    """GPU kernels launched by one call of ``fn`` (None if the profiler is unavailable)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as exc:  # profiler/CUPTI missing: report, do not fail the benchmark
        print(f"  (launch count unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def make_fn(provider: str, mode: str, x: torch.Tensor) -> Callable[[], object]:
    """One call of batch norm in ``mode`` by ``provider`` on ``x`` (fresh parameters and stats)."""
    import bnkit.functional
    from bnkit.kernels import use_backend

    c = x.shape[1]
    pd = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = torch.rand(c, device=x.device, dtype=pd).add_(0.5)
    b = torch.randn(c, device=x.device, dtype=pd)
    rm, rv = torch.zeros(c, device=x.device, dtype=pd), torch.ones(c, device=x.device, dtype=pd)
    bn = F.batch_norm if provider == "torch" else bnkit.functional.batch_norm

    if mode == "train_fwd":
        def call():
            return bn(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    elif mode == "eval_fwd":
        def call():
            return bn(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5)
    else:
        xg, wg, bg = x.detach().requires_grad_(), w.requires_grad_(), b.requires_grad_()
        dy = torch.randn_like(x)

        def call():
            y = bn(xg, rm, rv, wg, bg, training=True, momentum=0.1, eps=1e-5)
            return torch.autograd.grad(y, (xg, wg, bg), dy)  # no .grad accumulation kernels

    if provider == "torch":
        return call

    def call_bnkit():
        with use_backend("triton"):  # around forward AND backward: the backward dispatches on its own
            return call()

    return call_bnkit


def check_case(x: torch.Tensor, mode: str) -> None:
    """bnkit ran Triton (not the reference fallback) and agrees with torch on ``x``."""
    from bnkit.kernels import last_backend

    outs = []
    for provider in PROVIDERS:
        torch.manual_seed(0)
        out = make_fn(provider, mode, x)()
        if provider == "bnkit" and last_backend() != "triton":
            raise SystemExit(f"bench_gpu: bnkit ran the {last_backend()!r} backend, not triton, for {tuple(x.shape)}")
        outs.append(out if isinstance(out, tuple) else (out,))
    tol = {torch.float32: 1e-3, torch.float64: 1e-8}.get(x.dtype, 5e-2)
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def run_case(case: Case, dtype: torch.dtype, mode: str, timer: Timer, launches: bool, device) -> Row:
    x = case.make(dtype, device)
    nbytes = x.numel() * x.element_size()
    check_case(x, mode)
    y = torch.empty_like(x)
    copy_ms = timer(lambda: y.copy_(x))
    ms = {p: timer(make_fn(p, mode, x)) for p in PROVIDERS}
    moved = TRAFFIC[mode] * nbytes
    copy_gbps = gbps(2 * nbytes, copy_ms)
    row = Row(
        case=case.name,
        shape="x".join(map(str, case.shape)),
        layout=case.layout,
        dtype=str(dtype).replace("torch.", ""),
        mode=mode,
        bytes_per_tensor=nbytes,
        copy_ms=copy_ms,
        torch_ms=ms["torch"],
        bnkit_ms=ms["bnkit"],
        speedup=ms["torch"] / ms["bnkit"],
        torch_gbps=gbps(moved, ms["torch"]),
        bnkit_gbps=gbps(moved, ms["bnkit"]),
        torch_pct_copy=100 * gbps(moved, ms["torch"]) / copy_gbps,
        bnkit_pct_copy=100 * gbps(moved, ms["bnkit"]) / copy_gbps,
        bnkit_x_copy=ms["bnkit"] / copy_ms,
    )
    if launches:
        row.torch_launches = count_launches(make_fn("torch", mode, x))
        row.bnkit_launches = count_launches(make_fn("bnkit", mode, x))
    return row


def device_copy_bandwidth(timer: Timer, device) -> float:
    """GB/s of ``copy_`` between two 1 GiB buffers: the device's copy bandwidth."""
    a = torch.empty(1 << 30, dtype=torch.int8, device=device)
    b = torch.empty_like(a)
    return gbps(2 * a.numel(), timer(lambda: b.copy_(a)))


def print_table(rows: list[Row]) -> None:
    head = (f"{'case':<15} {'shape':<16} {'layout':<13} {'dtype':<8} {'mode':<13} {'copy ms':>8} "
            f"{'torch ms':>9} {'bnkit ms':>9} {'speedup':>7} {'GB/s':>7} {'%copy':>6} {'torch%':>6} "
            f"{'xcopy':>6} {'launch':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        launch = "-" if r.bnkit_launches is None else f"{r.bnkit_launches}/{r.torch_launches}"
        print(f"{r.case:<15} {r.shape:<16} {r.layout:<13} {r.dtype:<8} {r.mode:<13} {r.copy_ms:8.4f} "
              f"{r.torch_ms:9.4f} {r.bnkit_ms:9.4f} {r.speedup:7.2f} {r.bnkit_gbps:7.0f} {r.bnkit_pct_copy:6.1f} "
              f"{r.torch_pct_copy:6.1f} {r.bnkit_x_copy:6.2f} {launch:>7}")
    print("speedup = torch ms / bnkit ms; GB/s, %copy: bnkit (torch% for torch); launch: bnkit/torch kernels")


def write_results(rows: list[Row], meta: dict, out: Path) -> None:
    """``out/bench_gpu.json`` (meta + rows) and ``out/bench_gpu.csv`` (rows)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    fields = [f.name for f in dataclasses.fields(Row)]
    with open(out / "bench_gpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.csv'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, fewer repetitions")
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--dtypes", default="float32", help=f"for cases without a fixed dtype: {', '.join(DTYPES)}")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=50)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed run")
    p.add_argument("--no-launches", action="store_true", help="skip counting kernel launches (profiler)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_gpu.json and bench_gpu.csv")
    args = p.parse_args(argv)
    for m in args.modes.split(","):
        if m not in MODES:
            p.error(f"unknown mode {m!r}; expected {', '.join(MODES)}")
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; expected {', '.join(DTYPES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU. "
              "Nothing was measured.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_gpu: triton is not installed (pip install bnkit[triton]); nothing was measured.",
              file=sys.stderr)
        return 2

    device = torch.device("cuda")
    rep, warmup = (10, 3) if args.quick else (args.rep, args.warmup)
    timer = Timer(warmup, rep, flush=not args.no_flush, device=device)
    cases = [c for c in CASES if not args.quick or c.name in QUICK]
    if args.only:
        keys = args.only.split(",")
        cases = [c for c in cases if any(k in c.name for k in keys)]
    props = torch.cuda.get_device_properties(device)
    meta = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0)),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timing": f"median of {rep} runs after {warmup}, CUDA events, L2 flush {'off' if args.no_flush else 'on'}",
        "traffic_model": "bytes moved in tensor sizes: " + ", ".join(f"{m}={k}" for m, k in TRAFFIC.items()),
    }
    from bnkit.kernels import get_backend

    backend = get_backend("triton")
    if backend is None:
        print("bench_gpu: bnkit's triton backend failed to load (see the warning above); nothing was measured.",
              file=sys.stderr)
        return 2
    meta["bnkit_triton_options"] = {
        k: getattr(backend, k) for k in ("fused_max_bytes", "programs_per_sm", "tile", "max_block_c", "num_warps")
    }
    meta["copy_gbps_1gib"] = device_copy_bandwidth(timer, device)
    print(f"{meta['device']}: {meta['sm_count']} SMs, L2 {meta['l2_bytes'] >> 20} MiB, "
          f"copy bandwidth {meta['copy_gbps_1gib']:.0f} GB/s (1 GiB buffers); {meta['timing']}")

    rows: list[Row] = []
    for case in cases:
        dtypes = [case.dtype] if case.dtype else args.dtypes.split(",")
        for dname in dtypes:
            for mode in args.modes.split(","):
                print(f"  {case.name} {dname} {mode} ...", file=sys.stderr, flush=True)
                rows.append(run_case(case, DTYPES[dname], mode, timer, not args.no_launches, device))
                torch.cuda.empty_cache()
    print_table(rows)

    write_results(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
