"""Benchmark the batch-norm variants against their torch-composed equivalents, plus memory.

Time (median and min of ``--repeat`` runs after warm-up, forward and forward+backward;
ratios are against the first provider of each op, measured in the same run):

* fused BN + leaky_relu (standard, memory-saving) vs bnkit BN alone vs torch BN + LeakyReLU;
* batch renorm vs the paper's equations in plain torch ops;
* ghost batch norm vs ``torch.split`` + ``F.batch_norm`` per virtual batch + ``torch.cat``;
* frozen batch norm vs torchvision's ``x * scale + shift``.

Memory: one training step (forward, ``sum()``, backward) of a 10-layer
conv3x3(64->64)-BN-activation stack on a (16, 64, 56, 56) input, for torch BN +
LeakyReLU and for bnkit's BatchNormAct2d in its modes. Two numbers per model:

* *saved bytes*: every tensor autograd saves for backward passes through
  ``torch.autograd.graph.saved_tensors_hooks``; we sum the bytes of the distinct storages
  (a tensor saved by two nodes, e.g. an activation output that the next conv also saves,
  is held once) and also report the plain sum over all saves;
* *peak live bytes*: the CPU allocator's own allocation/free events, recorded by
  ``torch.profiler`` with ``profile_memory=True``; the running sum over the step, in time
  order, gives the peak above what was alive when the step started (weights, input).

Interleaved A/B (the issue's speed goals): fused ``BatchNormAct2d`` vs ``bnkit.nn.BatchNorm2d``
alone (no activation) on one layer, both providers run back to back in each of ``--rounds``
rounds in alternating order; the median and interquartile range of the per-round ratios
``fused / BN alone`` for the forward and forward+backward, for leaky_relu, relu and identity
(and elu, outside the goals), standard and memory-saving. Per-round ratios cancel the slow
drift of a shared machine that sequential medians cannot.

Run: ``PYTHONPATH=src python benchmarks/bench_variants.py [--quick] [--repeat N] [--rounds R]``; writes
``benchmarks/results/bench_variants.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bnkit
import bnkit.functional as bf
from bnkit.bench.timing import interleaved_times
from bnkit.kernels import backend_for

RESULTS = Path(__file__).resolve().parent / "results"


# --- timing -----------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    return timings_ms(fn, repeat, warmup)[0]


def timings_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> tuple[float, float]:
    """``(median, min)`` ms over ``repeat`` runs after ``warmup`` (the min resists a busy machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def fwd_and_full(make: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor],
                 repeat: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(median, min) ms of the forward alone and of forward + backward (gradient of a fixed ``dy``)."""
    xg = x.detach().clone().requires_grad_()
    g = torch.ones_like(x)

    def fwd() -> None:
        with torch.no_grad():
            make(x)

    def full() -> None:
        xg.grad = None
        for p in params:
            p.grad = None
        make(xg).backward(g)

    return timings_ms(fwd, repeat), timings_ms(full, repeat)


def torch_renorm(x, rm, rv, w, b, eps, r_max, d_max):
    dims = [0, 2, 3]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    sigma_b = (var + eps).sqrt()
    sigma = (rv + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - rm) / sigma).clamp(-d_max, d_max).detach()
    sh = (1, -1, 1, 1)
    xhat = (x - mean.view(sh)) / sigma_b.view(sh) * r.view(sh) + d.view(sh)
    return xhat * w.view(sh) + b.view(sh)


def time_rows(shape: tuple[int, ...], repeat: int) -> list[dict]:
    c = shape[1]
    x = torch.randn(shape)
    w = torch.rand(c).add_(0.5).requires_grad_()
    b = torch.randn(c).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    params = [w, b]
    vbs = max(2, shape[0] // 4)
    cases: dict[str, dict[str, Callable]] = {
        "bn+leaky_relu": {
            "torch BN + LeakyReLU": lambda t: F.leaky_relu(F.batch_norm(t, None, None, w, b, True), 0.01),
            "bnkit BN alone": lambda t: bf.batch_norm(t, None, None, w, b, True),
            "bnkit BN + LeakyReLU": lambda t: F.leaky_relu(bf.batch_norm(t, None, None, w, b, True), 0.01),
            "bnkit fused": lambda t: bf.batch_norm_act(t, None, None, w, b, True, activation="leaky_relu"),
            "bnkit fused memory_saving": lambda t: bf.batch_norm_act(
                t, None, None, w, b, True, activation="leaky_relu", memory_saving=True),
        },
        "batch_renorm": {
            "torch ops (paper equations)": lambda t: torch_renorm(t, rm, rv, w, b, 1e-5, 3.0, 5.0),
            "bnkit batch_renorm": lambda t: bf.batch_renorm(t, rm.clone(), rv.clone(), w, b, True),
        },
        "ghost_batch_norm": {
            "torch split + F.batch_norm + cat": lambda t: torch.cat(
                [F.batch_norm(ch, None, None, w, b, True) for ch in torch.split(t, vbs)]),
            "bnkit ghost_batch_norm": lambda t: bf.ghost_batch_norm(t, None, None, w, b, True,
                                                                    virtual_batch_size=vbs),
        },
        "frozen_batch_norm": {
            "torch x*scale+shift (torchvision)": lambda t: t * (w * (rv + 1e-5).rsqrt()).view(1, -1, 1, 1)
            + (b - rm * w * (rv + 1e-5).rsqrt()).view(1, -1, 1, 1),
            "torch F.batch_norm eval": lambda t: F.batch_norm(t, rm, rv, w, b, False),
            "bnkit frozen_batch_norm": lambda t: bf.frozen_batch_norm(t, rm, rv, w, b),
        },
    }
    copy_ms = median_ms(lambda: x.clone(), repeat)
    rows = []
    for op, providers in cases.items():
        base = None
        for provider, make in providers.items():
            (fwd, fwd_min), (full, full_min) = fwd_and_full(make, x, params, repeat)
            base = base or (fwd, full)
            rows.append({"kind": "time", "op": op, "provider": provider, "shape": "x".join(map(str, shape)),
                         "forward_ms": round(fwd, 3), "full_ms": round(full, 3),
                         "forward_min_ms": round(fwd_min, 3), "full_min_ms": round(full_min, 3),
                         "forward_vs_first": round(fwd / base[0], 3), "full_vs_first": round(full / base[1], 3),
                         "copy_ms": round(copy_ms, 3)})
    return rows


# --- interleaved A/B: fused BatchNormAct vs bnkit BN alone -------------------------------
#
# This kind of machine drifts (other load, frequency, a 2x swing between runs), so timing one
# provider after the other cannot resolve a 5% budget. Each round runs both providers back to
# back, in alternating order (bnkit.bench.timing.interleaved_times), and the statistic is the
# per-round ratio: drift slower than a round cancels out, and the median and interquartile range
# of the ratios say how sure the number is.

# elu is not under the 5%/10% goals (its exp costs on its own); its two rows show memory saving's cost there.
AB_CASES = (("leaky_relu", False), ("leaky_relu", True), ("relu", False), ("identity", False), ("identity", True),
            ("elu", False), ("elu", True))


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


def ab_rows(shape: tuple[int, ...], rounds: int) -> list[dict]:
    """Median (and IQR) of per-round ``fused / BN alone`` for the forward and forward+backward."""
    c = shape[1]
    torch.manual_seed(0)
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape)
    bn = bnkit.nn.BatchNorm2d(c).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    rows = []
    for activation, memory_saving in AB_CASES:
        param = 1.0 if activation == "elu" else 0.01
        act = bnkit.nn.BatchNormAct2d(c, activation=activation, activation_param=param,
                                      memory_saving=memory_saving).train()
        act.load_state_dict(bn.state_dict())

        def fwd(m):
            def run() -> None:
                with torch.no_grad():
                    m(x)
            return run

        def full(m):
            def run() -> None:
                xg.grad = None
                m.zero_grad(set_to_none=True)
                m(xg).backward(g)
            return run

        for mode, make in (("forward", fwd), ("forward+backward", full)):
            t = interleaved_times({"bn": make(bn), "act": make(act)}, runs=rounds, warmup=5)
            t_bn, t_act = t.times["bn"], t.times["act"]
            q1, med, q3 = _quartiles(t.ratios("act", "bn"))
            rows.append({"kind": "ab", "op": "fused vs BN alone", "provider": f"BatchNormAct2d({activation}"
                         + (", memory_saving)" if memory_saving else ")"), "shape": "x".join(map(str, shape)),
                         "mode": mode, "rounds": rounds, "ratio_median": round(med, 3), "ratio_q1": round(q1, 3),
                         "ratio_q3": round(q3, 3), "ratio_of_mins": round(min(t_act) / min(t_bn), 3),
                         "fused_ms": round(t.median("act") * 1e3, 3),
                         "bn_alone_ms": round(t.median("bn") * 1e3, 3)})
    return rows


def print_ab(rows: list[dict]) -> None:
    ab = [r for r in rows if r["kind"] == "ab"]
    if not ab:
        return
    print(f"\ninterleaved A/B, {ab[0]['rounds']} rounds, {ab[0]['shape']} fp32: fused / bnkit BN alone "
          "(goal: forward <= 1.05, forward+backward <= 1.10)")
    print(f"{'provider':<42} {'mode':<17} {'median':>7} {'IQR':>15} {'min/min':>8} {'fused ms':>9} {'BN ms':>8}")
    for r in ab:
        print(f"{r['provider']:<42} {r['mode']:<17} {r['ratio_median']:>7.3f} "
              f"{r['ratio_q1']:>7.3f}-{r['ratio_q3']:<7.3f} {r['ratio_of_mins']:>8.3f} {r['fused_ms']:>9.2f} "
              f"{r['bn_alone_ms']:>8.2f}")


# --- memory -----------------------------------------------------------------------------


def make_stack(kind: str, layers: int, c: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods.append(nn.Conv2d(c, c, 3, padding=1, bias=False))
        if kind == "torch BN + LeakyReLU":
            mods += [nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]
        elif kind == "bnkit BN + LeakyReLU":
            mods += [bnkit.nn.BatchNorm2d(c), nn.LeakyReLU(0.01)]
        elif kind == "bnkit fused":
            mods.append(bnkit.nn.BatchNormAct2d(c, activation="leaky_relu"))
        elif kind == "bnkit fused memory_saving":
            mods.append(bnkit.nn.BatchNormAct2d(c, activation="leaky_relu", memory_saving=True))
        elif kind == "bnkit fused memory_saving inplace":
            mods.append(bnkit.nn.BatchNormAct2d(c, activation="leaky_relu", memory_saving=True, inplace=True))
        else:
            raise ValueError(kind)
    return nn.Sequential(*mods)


MEMORY_KINDS = ("torch BN + LeakyReLU", "bnkit BN + LeakyReLU", "bnkit fused", "bnkit fused memory_saving",
                "bnkit fused memory_saving inplace")


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(distinct-storage bytes, plain sum of bytes) saved for backward by one forward."""
    storages: dict[int, int] = {}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        s = t.untyped_storage()
        total += s.nbytes()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values()), total


def peak_bytes(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) CPU bytes during ``step``, from the allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def memory_rows(shape: tuple[int, ...], layers: int) -> list[dict]:
    rows = []
    base = None
    for kind in MEMORY_KINDS:
        torch.manual_seed(0)
        model = make_stack(kind, layers, shape[1]).train()
        x = torch.randn(shape)
        distinct, total = saved_bytes(model, x)

        def step(model=model, x=x) -> None:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        step()  # warm-up: parameter .grad tensors exist before the measured step
        peak = peak_bytes(step)
        t0 = time.perf_counter()
        step()
        step_ms = (time.perf_counter() - t0) * 1e3
        base = base or (distinct, total, peak)
        rows.append({"kind": "memory", "op": f"{layers}x conv3x3-BN-act", "provider": kind,
                     "shape": "x".join(map(str, shape)), "saved_MB": round(distinct / 2**20, 1),
                     "saved_vs_torch": round(distinct / base[0], 3), "saved_sum_MB": round(total / 2**20, 1),
                     "saved_sum_vs_torch": round(total / base[1], 3), "peak_MB": round(peak / 2**20, 1),
                     "peak_vs_torch": round(peak / base[2], 3), "step_ms": round(step_ms, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run, not for quoting)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the interleaved A/B (after warm-up)")
    parser.add_argument("--skip-ab", action="store_true", help="skip the interleaved fused-vs-BN-alone A/B")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's count)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    time_shape = (4, 16, 16, 16) if args.quick else (16, 64, 56, 56)
    mem_shape = (2, 16, 16, 16) if args.quick else (16, 64, 56, 56)
    layers = 10
    rows = []
    if not args.skip_ab:
        rows += ab_rows(time_shape, max(2, args.rounds))
    if not args.skip_time:
        rows += time_rows(time_shape, max(1, args.repeat))
    if not args.skip_memory:
        rows += memory_rows(mem_shape, layers)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "backend": backend_for(torch.empty(2, 2)).name, "quick": args.quick,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for r in rows:
        if r["kind"] == "ab":
            continue
        keys = [k for k in r if k not in ("kind", "op", "shape")]
        print(f"{r['op']:<24} " + "  ".join(f"{k}={r[k]}" for k in keys))
    print_ab(rows)
    print(f"# {meta}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_variants_quick" if args.quick else "bench_variants"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fields = sorted({k for r in rows for k in r})
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
