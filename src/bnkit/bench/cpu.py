"""CPU benchmark: bnkit's numba backend against torch's native batch norm.

For every case (shape x memory layout x dtype) and mode (train forward, eval forward, train
forward+backward) it times torch's ``F.batch_norm`` and
``bnkit.functional.batch_norm`` under the ``cpu`` backend, and the copy of the same tensor
(the memory-bandwidth yardstick), interleaved in the same rounds (one call of each per round,
>= 15 rounds after warm-up): times are medians over rounds, and speedup and multiples of the
copy are medians of the per-round ratios, so the machine's drift cancels.
One end-to-end row times a training step of a small ResNet-style CNN with torch BN and with
bnkit BN (``bnkit.convert``). Results print as a table and are written as JSON and CSV.

Entry point: :func:`main` (``python benchmarks/bench_cpu.py`` and ``bnkit bench`` call it).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnkit
from bnkit.bench.timing import interleaved_times

__all__ = ["CASES", "QUICK_CASES", "Case", "main", "run"]

MODES = ("train_fwd", "eval_fwd", "train_fwd_bwd")


@dataclass(frozen=True)
class Case:
    """One input: logical shape (N, C, *), memory layout and dtype."""

    shape: tuple[int, ...]
    layout: str = "contiguous"  # contiguous | channels_last | ncl_view ((N,C,L) view of (N,L,C) memory)
    dtype: torch.dtype = torch.float32

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        tags = [] if self.layout == "contiguous" else [self.layout]
        if self.dtype != torch.float32:
            tags.append(str(self.dtype).replace("torch.", ""))
        return dims + (f" [{', '.join(tags)}]" if tags else "")

    def make(self) -> Tensor:
        if self.layout == "ncl_view":
            n, c, length = self.shape
            return torch.randn(n, length, c).to(self.dtype).transpose(1, 2)
        x = torch.randn(self.shape).to(self.dtype)
        if self.layout == "channels_last":
            return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        return x


CASES = [
    Case((32, 64, 56, 56)),
    Case((64, 256, 14, 14)),
    Case((256, 512, 7, 7)),
    Case((8, 32, 128, 128)),
    Case((32, 64, 56, 56), "channels_last"),
    Case((64, 256, 14, 14), "channels_last"),
    Case((4096, 1024)),
    Case((64, 128, 1000)),
    Case((64, 128, 1000), "ncl_view"),
    Case((16, 16, 8, 8)),
    Case((4, 8, 4, 4, 4)),
    Case((32, 64, 56, 56), dtype=torch.bfloat16),
    Case((64, 256, 14, 14), "channels_last", torch.bfloat16),
]

QUICK_CASES = [
    Case((16, 16, 8, 8)),
    Case((8, 64, 28, 28)),
    Case((8, 64, 28, 28), "channels_last"),
    Case((1024, 256)),
    Case((16, 64, 100), "ncl_view"),
]


def _bn_fn(case: Case, mode: str, impl: str) -> Callable[[], object]:
    """A no-argument callable running one batch norm ``mode`` with ``impl`` (torch | bnkit)."""
    x = case.make()
    c = case.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    training = mode != "eval_fwd"
    bn = F.batch_norm if impl == "torch" else bnkit.functional.batch_norm
    if mode != "train_fwd_bwd":
        return lambda: bn(x, rm, rv, w, b, training=training)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    dy = torch.randn_like(x)

    def step() -> None:
        x.grad = w.grad = b.grad = None
        bn(x, rm, rv, w, b, training=True).backward(dy)

    return step


def _resnet(width: int, blocks: int = 2) -> nn.Module:
    """A small ResNet-style CNN (3 stages of basic residual blocks, conv-BN-ReLU)."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(h)) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for i in range(blocks):
            layers.append(Block(cin, cout, 2 if (stage > 0 and i == 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _e2e_row(batch: int, width: int, size: int, runs: int) -> dict:
    """Training step (forward, cross-entropy, backward, SGD) with torch BN vs bnkit BN."""
    torch.manual_seed(0)
    model = _resnet(width)
    twin = bnkit.convert(copy.deepcopy(model))
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))

    def stepper(net: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), target).backward()
            opt.step()

        return step

    step_torch, step_bnkit = stepper(model), stepper(twin)
    with bnkit.use_backend("cpu"):
        t = interleaved_times({"torch": step_torch, "bnkit": step_bnkit}, runs=runs, same_calls=("torch", "bnkit"))
        backend = bnkit.last_backend()
    t_torch, t_bnkit = t.median("torch"), t.median("bnkit")
    share = _torch_bn_share(step_torch)
    return {
        "case": f"ResNet-style CNN step, batch {batch}x3x{size}x{size}, width {width}",
        "mode": "train_step",
        "backend": backend,
        "torch_ms": t_torch * 1e3,
        "bnkit_ms": t_bnkit * 1e3,
        "speedup": t.ratio("torch", "bnkit"),
        "copy_ms": None,
        "torch_x_copy": None,
        "bnkit_x_copy": None,
        # Amdahl: with BN taking this share of torch's step, no BN can make the step faster
        # than 1 / (1 - share).
        "torch_bn_share": share,
    }


def _torch_bn_share(step: Callable[[], None], steps: int = 3) -> float:
    """Share of the step's CPU time spent in torch's batch-norm ops (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(e.self_cpu_time_total for e in events if "batch_norm" in e.key)
    return bn / total if total else float("nan")


def run(cases: list[Case], runs: int, e2e: tuple[int, int, int] | None, progress: bool = True) -> list[dict]:
    """Time every case and mode; returns one dict per row (times in milliseconds)."""
    rows = []
    for case in cases:
        x_copy = case.make()
        for mode in MODES:
            fns = {"copy": x_copy.clone, "torch": _bn_fn(case, mode, "torch"), "bnkit": _bn_fn(case, mode, "bnkit")}
            # torch's F.batch_norm does not look at bnkit's backend, so one context serves all three.
            with bnkit.use_backend("cpu"):
                t = interleaved_times(fns, runs=runs, same_calls=("torch", "bnkit"))
                backend = bnkit.last_backend()
            rows.append(
                {
                    "case": case.label,
                    "mode": mode,
                    "backend": backend,
                    "torch_ms": t.median("torch") * 1e3,
                    "bnkit_ms": t.median("bnkit") * 1e3,
                    "speedup": t.ratio("torch", "bnkit"),
                    "copy_ms": t.median("copy") * 1e3,
                    "torch_x_copy": t.ratio("torch", "copy"),
                    "bnkit_x_copy": t.ratio("bnkit", "copy"),
                }
            )
            if progress:
                print(_plain_line(rows[-1]), file=sys.stderr, flush=True)
    if e2e is not None:
        rows.append(_e2e_row(*e2e, runs=runs))
    return rows


COLUMNS = [
    ("case", "case"),
    ("mode", "mode"),
    ("torch_ms", "torch ms"),
    ("bnkit_ms", "bnkit ms"),
    ("speedup", "speedup"),
    ("torch_x_copy", "torch/copy"),
    ("bnkit_x_copy", "bnkit/copy"),
    ("backend", "backend"),
]


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if key.endswith("_ms") else f"{value:.2f}"
    return str(value)


def _plain_line(row: dict) -> str:
    return "  ".join(f"{_fmt(k, row[k]):>10}" if k != "case" else f"{row[k]:<32}" for k, _ in COLUMNS)


def machine_info() -> dict:
    """Where the numbers came from (the README quotes them with this)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import numba

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def print_table(rows: list[dict], title: str) -> None:
    """A rich table on a terminal, plain aligned text otherwise (logs, CI, pipes)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for key, head in COLUMNS:
            table.add_column(head, justify="left" if key in ("case", "mode", "backend") else "right")
        for row in rows:
            table.add_row(*(_fmt(k, row[k]) for k, _ in COLUMNS))
        Console().print(table)
        return
    print(title)
    print("  ".join(f"{h:>10}" if k != "case" else f"{h:<32}" for k, h in COLUMNS))
    for row in rows:
        print(_plain_line(row))


def write_results(rows: list[dict], info: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # the e2e row has one more
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def main(argv: list[str] | None = None) -> int:
    """``bnkit bench [--quick] [--runs N] [--out DIR] [--threads N] [--no-e2e]``."""
    parser = argparse.ArgumentParser(prog="bnkit bench", description="bnkit cpu backend vs torch native batch norm")
    parser.add_argument("--quick", action="store_true", help="a few small fp32 cases (< 1 minute)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per measurement (>= 15; median)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where JSON/CSV go")
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default torch's")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end CNN training step")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = QUICK_CASES if args.quick else CASES
    e2e = None if args.no_e2e else ((8, 8, 16) if args.quick else (32, 32, 32))
    info = machine_info()
    rows = run(cases, args.runs, e2e)
    title = f"bnkit cpu vs torch native ({info['cpu']}, {info['torch_threads']} threads)"
    print_table(rows, title)
    for row in rows:
        if "torch_bn_share" in row:
            share = row["torch_bn_share"]
            print(f"{row['case']}: torch's batch norm is {share:.1%} of torch's step (profiler), so replacing it "
                  f"cannot make the step faster than {1 / (1 - share):.2f}x")
    paths = write_results(rows, info, args.out, "cpu_quick" if args.quick else "cpu")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
