"""Compile bnkit's CPU kernels ahead of time (``bnkit warmup``), for Docker images, CI and new machines.

numba compiles a kernel on its first call for each dtype and keeps it in its on-disk cache; a process that
finds the cache filled starts in well under a second. :func:`warmup` runs every path of the CPU kernels
once, through the public layers and the ``cpu`` backend's primitives, on inputs chosen so that each plan
(small inputs, serial and parallel; groups of short rows; short rows with and without tables; long rows,
fused or in parts; channels innermost: channels_last, ``(N, C)``, an ``(N, C, L)`` view; the fused
BN+activation kernels) runs in each mode (training forward and backward, eval, eval with a graph).
The calls go through the same plan functions as a user's, so the list follows the code: a new path is
compiled as soon as one of these inputs reaches it. It lives in ``utils`` because it drives the ``nn``
layers; the kernels package only announces a compile (:mod:`bnkit.kernels.compiling`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "WarmupReport", "warmup"]

DTYPES = ("float32", "float64", "bfloat16")

# name -> (shape, channels_last, (N, C, L) view of (N, L, C) memory): one input per plan of the kernels
# (the plan functions of bnkit.kernels.cpu.plan decide; these sizes land in each on any thread count >= 2)
_INPUTS: dict[str, tuple[tuple[int, ...], bool, bool]] = {
    "small": ((16, 16, 8, 8), False, False),
    "small, parallel": ((32, 32, 16, 16), False, False),
    "small, channels_last": ((16, 16, 8, 8), True, False),
    "groups of short rows": ((64, 64, 14, 14), False, False),
    "short rows, tables": ((1024, 64, 4, 4), False, False),
    "short rows": ((256, 64, 8, 8), False, False),
    "long rows": ((8, 16, 64, 128), False, False),
    "long rows in parts": ((2, 2, 512, 512), False, False),
    "channels_last": ((64, 64, 16, 16), True, False),
    "(N, C)": ((8192, 128), False, False),
    "(N, C, L) view": ((64, 128, 128), False, True),
    "(N, C, L)": ((64, 128, 128), False, False),
}


@dataclass(frozen=True)
class WarmupReport:
    """What :func:`warmup` did: the dtypes, the number of steps run and the time it took."""

    dtypes: tuple[str, ...]
    steps: int
    seconds: float
    compiled: tuple[str, ...]  # dtypes whose kernels had to compile (the others came from numba's cache)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).strip(), None)
    if not isinstance(dt, torch.dtype) or dt not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"dtypes must be float32, float64, bfloat16 or float16, got {name!r}")
    return dt


def _input(name: str, dtype: torch.dtype) -> torch.Tensor:
    shape, channels_last, view = _INPUTS[name]
    if view:  # (N, C, L) view of (N, L, C) memory
        n, c, length = shape
        return torch.randn(n, length, c).to(dtype).transpose(1, 2)
    x = torch.randn(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _layer_steps(x: torch.Tensor) -> None:
    """The module in every mode: training forward + backward, training without a graph, eval, eval + backward;
    with and without affine parameters."""
    from bnkit import nn as bnn

    cls = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d}[x.dim()]
    for affine in (True, False):
        m = cls(x.shape[1], affine=affine).to(x.dtype)
        xg = x.detach().requires_grad_()
        m(xg).sum().backward()
        with torch.no_grad():
            m(x)
        m.eval()
        with torch.no_grad():
            m(x)
        m(xg).sum().backward()


def _backend_steps(x: torch.Tensor) -> None:
    """The ``cpu`` backend's primitives (the road of calls the one-call path does not take)."""
    from bnkit import kernels
    from bnkit.reference import stats_dtype

    be = kernels.get_backend("cpu")
    if be is None or not be.supports(x):
        return
    sd = stats_dtype(x.dtype)
    c = x.shape[1]
    w, b = torch.rand(c, dtype=sd) + 0.5, torch.randn(c, dtype=sd)
    dy = torch.randn_like(x, dtype=torch.float32).to(x.dtype)
    for weight, bias in ((w, b), (None, None)):
        y, mean, var = be.forward_train(x, weight, bias, 1e-5)
        invstd = (var + 1e-5).rsqrt()
        scale = invstd if weight is None else invstd * weight
        shift = torch.zeros(c, dtype=sd) if bias is None else bias
        be.forward_eval(x, mean, scale, shift)
        running = getattr(be, "forward_eval_running", None)  # optional fused method (the cpu backend's)
        if running is not None:
            running(x, mean, var, weight, bias, 1e-5)
        be.backward_train(dy, x, mean, invstd, weight)
        be.backward_eval(dy, x, mean, scale, invstd)
    be.backward_reduce(dy, x, mean)
    be.backward_input(dy, x, mean, scale, invstd, shift)


def _act_steps(dtype: torch.dtype) -> None:
    """The fused BN+activation kernels (float32/float64): per channel and per row, standard and memory saving."""
    from bnkit.nn import BatchNormAct2d

    for shape in ((16, 16, 8, 8), (64, 2, 32, 32)):
        for activation, memory_saving in (("relu", False), ("leaky_relu", True), ("elu", True)):
            m = BatchNormAct2d(shape[1], activation=activation, memory_saving=memory_saving).to(dtype)
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            m(x).sum().backward()
            m.eval()
            m(x).sum().backward()


def _steps(dtypes: Sequence[torch.dtype]) -> list[tuple[str, Callable[[], None]]]:
    steps: list[tuple[str, Callable[[], None]]] = []
    for dt in dtypes:
        label = str(dt).replace("torch.", "")
        for name in _INPUTS:
            steps.append((f"{label}: {name}", lambda n=name, d=dt: _layer_steps(_input(n, d))))
            steps.append((f"{label}: {name}, backend", lambda n=name, d=dt: _backend_steps(_input(n, d))))
        if dt in (torch.float32, torch.float64):
            steps.append((f"{label}: batch norm + activation", lambda d=dt: _act_steps(d)))
    return steps


def warmup(
    dtypes: Sequence[str | torch.dtype] = DTYPES,
    on_step: Callable[[int, int, str], None] | None = None,
) -> WarmupReport:
    """Compile (or load from numba's cache) every CPU kernel bnkit may run for ``dtypes`` on this machine.

    ``on_step(done, total, label)`` is called before each step (``label`` says what compiles next) and once
    at the end with ``done == total``. Kernels already in numba's cache only load; the report says which
    dtypes had to compile. Torch's thread count is raised to 2 for the duration where numba has 2 threads,
    so the parallel kernels compile even on a process set to one thread.
    """
    import numba

    from bnkit.kernels import compiling

    dts = [_dtype(d) for d in dtypes]
    steps = _steps(dts)
    before = compiling.compiled_dtypes()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        if threads < 2 <= numba.config.NUMBA_NUM_THREADS:
            torch.set_num_threads(2)
        with compiling.quiet(), torch.random.fork_rng():
            torch.manual_seed(0)
            for i, (label, step) in enumerate(steps):
                if on_step is not None:
                    on_step(i, len(steps), label)
                step()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    if on_step is not None:
        on_step(len(steps), len(steps), "done")
    compiled = tuple(sorted(compiling.compiled_dtypes() - before))
    return WarmupReport(tuple(str(d).replace("torch.", "") for d in dts), len(steps), seconds, compiled)
